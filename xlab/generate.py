"""`python -m xlab.generate ckpt=PATH prompt="..." [sampler=greedy|multinomial|top_k|top_p|beam] ...`.

Prompts come from `prompt=`, `prompts_file=` (one per line) or `prompts_from=predict` (the start of held-out
documents, written beside their true continuation; xlab/data/predict.py). `output=text` prints the texts (a single
sampled prompt streams token by token); `output=jsonl` prints one JSON object per sequence with prompt, text,
tokens (generated ids, eos included if produced) and, for beam search, score.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import MISSING, DictConfig

from xlab.checkpoint.read import Checkpoint
from xlab.cli import hydra_app, typed
from xlab.data.config import Split
from xlab.data.datamodule import XLabDataModule
from xlab.data.predict import Sample, split_prompts, write_samples
from xlab.device import pick_device
from xlab.errors import XLabError
from xlab.generation.api import Loaded, cut_at_stop, generate_ids, load_for_decoding
from xlab.generation.config import CacheKind, InferenceDtype, SamplerConfig
from xlab.generation.fast import plan
from xlab.generation.sampling import check_beam_length, check_sampler_config
from xlab.generation.speculative import refuse_beam
from xlab.schema import AT_LEAST_1, NON_NEGATIVE, Choice, PathsConfig, Range, Schema, Switch


class OutputFormat(Choice):
    text = "text"
    jsonl = "jsonl"  # one JSON object per sequence: prompt, text, tokens (and score for beam search)


@dataclass
class GenerateConfig(Schema):
    ckpt: str = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    prompt: str | None = None  # one prompt (sos is prepended)
    prompts_file: str | None = None  # or one prompt per line of a UTF-8 file
    num_samples: int = 1  # sequences per prompt (sampling; beam search uses sampler.num_return_sequences)
    max_new_tokens: int = 50
    temperature: float | None = None  # shortcut for sampler.temperature
    seed: int | None = 0
    output: OutputFormat = OutputFormat.text
    batch_size: int = 8  # prompts decoded together
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    prompts_from: Split | None = None  # a split (predict): prompt with the first prompt_tokens of its documents
    num_prompts: int = 8
    prompt_tokens: int = 32
    out: str | None = None  # prompts_from output prefix; None = <checkpoint dir>/samples_<split>.{jsonl,md}
    dtype: InferenceDtype = InferenceDtype.auto
    # torch.compile the one-token step; auto = on GPUs (CUDA graphs), off on CPUs, where the compile pays back only
    # after many thousand tokens (BENCHMARKS.md, decoding)
    compile: Switch = Switch.auto
    cache: CacheKind = CacheKind.auto
    draft: str | None = None  # speculative decoding: a smaller checkpoint with the same tokenizer (greedy, sampling)
    draft_tokens: int = 4  # tokens the draft proposes per target forward
    paths: PathsConfig = field(default_factory=PathsConfig)

    LIMITS = {
        "num_samples": AT_LEAST_1, "draft_tokens": Range(1, 16), "max_new_tokens": NON_NEGATIVE,
        "seed": Range(0, 2**32 - 1, note="(or null)"),
        "temperature": SamplerConfig.LIMITS["temperature"], "batch_size": AT_LEAST_1, "num_prompts": AT_LEAST_1,
        "prompt_tokens": AT_LEAST_1,
    }


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        try:
            prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise XLabError(f"cannot read prompts_file={str(path)!r}: {exc}") from None
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise XLabError(f"prompts_file={str(path)!r} has no non-empty line")
        return prompts
    if not cfg.prompt:
        raise XLabError("the prompt is empty: give prompt=TEXT, prompts_file=FILE or prompts_from=predict")
    return [cfg.prompt]


class Streamer:
    """Prints one sequence's text as tokens arrive (decoding the whole tail, so multi-byte characters are whole)."""

    def __init__(self, tokenizer, prompt: str) -> None:
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""
        print(prompt, end="", flush=True)

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def report(decoding) -> None:
    """After speculative decoding: how much of the draft the target kept."""
    stats = decoding.stats
    if decoding.draft is not None and stats.get("drafted"):
        rate = stats["accepted"] / stats["drafted"]
        per_forward = (stats["accepted"] + stats["rounds"]) / stats["rounds"]
        print(f"speculative: {stats['accepted']}/{stats['drafted']} draft tokens accepted ({100 * rate:.0f}%), "
              f"{per_forward:.2f} tokens per target forward", file=sys.stderr, flush=True)


def validate(cfg: DictConfig) -> None:
    """The schema's checks, the sampler's and the device, before any work."""
    cfg = typed(cfg)
    check_sampler_config(cfg.sampler)
    check_beam_length(cfg.sampler, cfg.max_new_tokens)
    plan(cfg.dtype, cfg.compile, cfg.cache, pick_device(cfg.device))
    if cfg.draft is not None:
        refuse_beam(cfg.sampler.name)


def load(cfg: GenerateConfig, ckpt: str | Checkpoint) -> Loaded:
    return load_for_decoding(ckpt, pick_device(cfg.device), cfg.dtype, cfg.compile, cfg.cache, cfg.draft,
                             cfg.draft_tokens)


def task(cfg: GenerateConfig) -> list:
    sampler = cfg.sampler if cfg.temperature is None else replace(cfg.sampler, temperature=cfg.temperature)
    check_sampler_config(sampler)
    if cfg.prompts_from is not None:
        return predict_split(cfg, sampler)
    prompts = read_prompts(cfg)
    loaded = load(cfg, cfg.ckpt)
    model, tokenizer, decoding = loaded.model, loaded.tokenizer, loaded.decoding
    repeats = cfg.num_samples if sampler.name != "beam" else 1
    jobs = [p for p in prompts for _ in range(repeats)]
    stream = len(jobs) == 1 and cfg.output == "text" and sampler.name != "beam" and not sampler.stop
    results = []
    for start in range(0, len(jobs), cfg.batch_size):  # seeded per batch: reproducible for a given batch_size
        batch = jobs[start:start + cfg.batch_size]
        streamer = Streamer(tokenizer, batch[0]) if stream else None
        seed = None if cfg.seed is None else cfg.seed + start
        for row, tokens, score in generate_ids(model, tokenizer, [tokenizer.encode(p) for p in batch], sampler,
                                               cfg.max_new_tokens, seed, on_token=streamer, decoding=decoding):
            text, _ = cut_at_stop(tokenizer.decode(tokens), sampler.stop)
            record = {"prompt": batch[row], "text": text, "tokens": tokens}
            if score is not None:
                record["score"] = score
            results.append(record)
            if cfg.output == "jsonl":
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not stream:
                print(batch[row] + text, end="\n---\n" if len(jobs) > 1 or sampler.num_return_sequences > 1 else "\n",
                      flush=True)
    if stream:
        sys.stdout.write("\n")
    report(decoding)
    return results


def predict_split(cfg: GenerateConfig, sampler: SamplerConfig) -> list:
    """Sample a continuation of the first prompt_tokens tokens of num_prompts documents of a split."""
    loaded = load(cfg, Checkpoint(cfg.ckpt))
    ckpt, model, tokenizer, decoding = loaded.ckpt, loaded.model, loaded.tokenizer, loaded.decoding
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cfg.paths.cache_dir)
    prompts = split_prompts(datamodule.tokens(cfg.prompts_from), tokenizer, cfg.num_prompts, cfg.prompt_tokens,
                            cfg.max_new_tokens, cfg.prompts_from)
    generated = {}
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        seed = None if cfg.seed is None else cfg.seed + start
        for row, tokens, _ in generate_ids(model, tokenizer, [p.prompt_ids for p in batch], sampler,
                                           cfg.max_new_tokens, seed, decoding=decoding):
            generated.setdefault(start + row, [t for t in tokens if t != tokenizer.eos_id])
    report(decoding)
    samples = [Sample(p.document, tokenizer.decode(p.prompt_ids), tokenizer.decode(generated[i]),
                      tokenizer.decode(p.true_ids), len(p.prompt_ids), len(generated[i]))
               for i, p in enumerate(prompts)]
    prefix = Path(cfg.out) if cfg.out else ckpt / f"samples_{cfg.prompts_from}"
    header = (f"Samples on the {cfg.prompts_from} split of {ckpt} (prompt_tokens={cfg.prompt_tokens}, "
              f"max_new_tokens={cfg.max_new_tokens}, sampler={sampler.name}, temperature={sampler.temperature}, "
              f"seed={cfg.seed})")
    jsonl, md = write_samples(samples, prefix, header)
    for s in samples:
        print(f"[{s.document}] {s.prompt!r} -> {s.generated!r} (true: {s.true_continuation!r})")
    print(f"wrote {jsonl} and {md}")
    return samples


main = hydra_app("generate", task, GenerateConfig, validate)

if __name__ == "__main__":
    main()
