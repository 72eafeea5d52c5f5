"""`python -m xlab.generate ckpt=PATH prompt="..." [sampler=greedy|multinomial|top_k|top_p|beam] ...`.

Prompts come from `prompt=`, `prompts_file=` (one per line) or `prompts_from=predict` (the start of held-out
documents, written beside their true continuation; xlab/data/predict.py). `output=text` prints the texts (a single
sampled prompt streams token by token); `output=jsonl` prints one JSON object per sequence with prompt, text,
tokens (generated ids, eos included if produced) and, for beam search, score.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xlab.cli import hydra_app


def read_prompts(cfg) -> list[str]:
    from xlab.errors import XLabError

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


def load_model(cfg, ckpt, device, tokenizer):
    """The checkpoint's model (and draft=, if given) converted for decoding as dtype/compile/cache say; prints the
    path taken."""
    from xlab.decoding import describe, for_inference, plan
    from xlab.models import XLabModel

    dtype, decoding = plan(cfg.dtype, cfg.compile, cfg.cache, device)
    model = for_inference(XLabModel.load_from_checkpoint(ckpt, map_location=device), dtype)
    speculative = ""
    if cfg.draft is not None:  # speculation runs both models eagerly over static caches (xlab/speculative.py)
        decoding.static, decoding.compile = True, False
        decoding.draft, decoding.draft_tokens = load_draft(cfg.draft, model, tokenizer, device, dtype), cfg.draft_tokens
        speculative = f", speculative with draft={cfg.draft} ({cfg.draft_tokens} tokens per target forward)"
    print(describe(dtype, decoding, device) + speculative, file=sys.stderr, flush=True)  # stderr: jsonl stays parseable
    return model, decoding


def load_draft(path, target, tokenizer, device, dtype):
    from xlab.checkpoint import resolve_checkpoint
    from xlab.datamodules import XLabDataModule
    from xlab.decoding import for_inference
    from xlab.errors import XLabError
    from xlab.models import XLabModel
    from xlab.speculative import check_draft

    ckpt = resolve_checkpoint(path)
    if XLabDataModule.load_from_checkpoint(ckpt).tokenizer.tokenizer.get_vocab() != tokenizer.tokenizer.get_vocab():
        raise XLabError(f"draft={path!r} has another tokenizer than ckpt: the draft must share the target's")
    draft = for_inference(XLabModel.load_from_checkpoint(ckpt, map_location=device), dtype)
    check_draft(target, draft)
    return draft


def report(decoding) -> None:
    """After speculative decoding: how much of the draft the target kept."""
    stats = decoding.stats
    if decoding.draft is not None and stats.get("drafted"):
        rate = stats["accepted"] / stats["drafted"]
        per_forward = (stats["accepted"] + stats["rounds"]) / stats["rounds"]
        print(f"speculative: {stats['accepted']}/{stats['drafted']} draft tokens accepted ({100 * rate:.0f}%), "
              f"{per_forward:.2f} tokens per target forward", file=sys.stderr, flush=True)


def validate(cfg: DictConfig) -> None:
    """The schema's checks (xlab/config.py), the sampler's and the device, before any work."""
    from omegaconf import open_dict

    from xlab.decoding import plan
    from xlab.evaluate import pick_device
    from xlab.sampling import check_beam_length, check_sampler_config

    with open_dict(cfg):
        del cfg["hydra"]
    cfg = OmegaConf.to_object(cfg)
    check_sampler_config(cfg.sampler)
    check_beam_length(cfg.sampler, cfg.max_new_tokens)
    plan(cfg.dtype, cfg.compile, cfg.cache, pick_device(cfg.device))
    if cfg.draft is not None:
        from xlab.speculative import refuse_beam

        refuse_beam(cfg.sampler.name)


def task(cfg: DictConfig) -> list:
    from xlab.datamodules import XLabDataModule
    from xlab.evaluate import pick_device
    from xlab.inference import cut_at_stop, generate_ids
    from xlab.sampling import check_sampler_config

    cfg = OmegaConf.to_object(cfg)
    sampler = cfg.sampler if cfg.temperature is None else replace(cfg.sampler, temperature=cfg.temperature)
    check_sampler_config(sampler)
    if cfg.prompts_from is not None:
        return predict_split(cfg, sampler)
    prompts = read_prompts(cfg)
    device = pick_device(cfg.device)
    tokenizer = XLabDataModule.load_from_checkpoint(cfg.ckpt).tokenizer
    model, decoding = load_model(cfg, cfg.ckpt, device, tokenizer)
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


def predict_split(cfg, sampler) -> list:
    """Sample a continuation of the first prompt_tokens tokens of num_prompts documents of a split."""
    from xlab.checkpoint import resolve_checkpoint
    from xlab.data.predict import Sample, split_prompts, write_samples
    from xlab.datamodules import XLabDataModule
    from xlab.evaluate import pick_device
    from xlab.inference import generate_ids

    ckpt = resolve_checkpoint(cfg.ckpt)
    device = pick_device(cfg.device)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cfg.paths.cache_dir)
    tokenizer = datamodule.tokenizer
    prompts = split_prompts(datamodule.tokens(cfg.prompts_from), tokenizer, cfg.num_prompts, cfg.prompt_tokens,
                            cfg.max_new_tokens, cfg.prompts_from)
    model, decoding = load_model(cfg, ckpt, device, tokenizer)
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


main = hydra_app("generate", task, validate)

if __name__ == "__main__":
    main()
