"""Sampling from a trained model: the original nanoGPT-style `sample`, a batched `generate` over any sampler, and
`load_for_decoding`, which generate, serve and the lm-eval harness load a checkpoint with.

    from xlab import inference
    out = inference.generate(model, tokenizer, ["The list", "A dict"], sampler="beam", num_beams=4)
    out[0].text, out[0].tokens, out[0].score
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from xlab.checkpoint.read import Checkpoint
from xlab.data.datamodule import XLabDataModule
from xlab.data.tokenizer import XLabTokenizer
from xlab.errors import XLabError
from xlab.generation.config import SamplerConfig
from xlab.generation.fast import DecodeOptions, describe, for_inference, plan
from xlab.generation.sampling import SAMPLERS, check_beam_length, check_sampler_config, decode_tokens
from xlab.generation.speculative import check_draft, speculative_decode
from xlab.models.transformer import XLabModel


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation, cut at the first stop string
    tokens: list[int]  # generated ids, eos included if produced
    score: float | None = None  # beam search: length-normalised log-probability


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    output_length: int,
    block_size: int,
    eos_class: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The original nanoGPT-style API: sample up to `output_length` new tokens after the 1-D prompt `inputs`
    (multinomial with temperature; 0 = greedy), stopping at `eos_class` (not returned). The model sees at most the
    last `block_size` tokens. Returns the new token ids."""
    if inputs.dim() != 1 or inputs.numel() == 0:
        raise XLabError("inputs must be a non-empty 1-D tensor of token ids")
    if output_length < 0:
        raise XLabError(f"output_length={output_length} must be >= 0")
    cfg = SamplerConfig(name="multinomial", temperature=temperature)
    check_sampler_config(cfg)
    ids = inputs[-min(block_size, model.max_len):][None]
    eos = [eos_class] if eos_class is not None else []
    tokens = decode_tokens(model, ids, torch.ones_like(ids), cfg, output_length, eos, generator)[0].tokens
    return tokens[:-1] if tokens and tokens[-1] == eos_class else tokens


def left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sampler_config(sampler: str | SamplerConfig | dict, **options: object) -> SamplerConfig:
    if isinstance(sampler, str):
        cfg = SamplerConfig(name=sampler)
        if sampler == "greedy":
            cfg = replace(cfg, temperature=0.0)
    elif isinstance(sampler, dict):
        cfg = SamplerConfig(**sampler)
    else:
        cfg = sampler
    known = {f.name for f in fields(SamplerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise XLabError(f"unknown sampler option(s) {unknown}; valid: {', '.join(sorted(known))}")
    cfg = replace(cfg, **options)
    check_sampler_config(cfg)
    return cfg


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    cfg: SamplerConfig,
    max_new_tokens: int = 50,
    seed: int | Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    decoding: DecodeOptions | None = None,
    is_done: Callable[[int, list[int]], bool] | None = None,
    on_logprobs: Callable[[torch.Tensor], None] | None = None,
) -> list[tuple[int, list[int], float | None]]:
    """Decode token-id prompts (sos is prepended); returns (prompt index, generated ids, beam score) tuples.
    decoding: the fast path's options (xlab/generation/fast.py); None = the dynamic KV cache, eager. seed: one seed for
    the batch, or one per prompt (each row then samples from its own generator: the same tokens whichever rows
    share its batch). is_done(row, tokens) ends a row early, besides stop strings and eos; on_logprobs: see
    xlab.generation.sampling.decode_tokens (token samplers only)."""
    if max_new_tokens < 0:
        raise XLabError(f"max_new_tokens={max_new_tokens} must be >= 0")
    check_beam_length(cfg, max_new_tokens)
    if not prompts:
        raise XLabError("no prompts given")
    encoded = []
    for ids in prompts:
        ids = [tokenizer.sos_id, *ids]
        if len(ids) > model.max_len - 1:
            warnings.warn(f"prompt of {len(ids)} tokens keeps its last {model.max_len - 1} (max_len={model.max_len})",
                          stacklevel=2)
            ids = ids[-(model.max_len - 1):]
        encoded.append(ids)
    input_ids, mask = left_pad(encoded, tokenizer[tokenizer.pad_token], model.device)
    generator = generators(seed, len(prompts), decoding)
    extra = {} if on_logprobs is None else {"on_logprobs": on_logprobs}

    def done(row: int, tokens: list[int]) -> bool:  # stop strings (and the caller's is_done) end a row early
        if is_done is not None and is_done(row, tokens):
            return True
        return bool(cfg.stop) and cut_at_stop(tokenizer.decode(tokens), cfg.stop)[1]

    decoder = SAMPLERS.get(cfg.name) if decoding is None or decoding.draft is None else speculative_decode
    seqs = decoder(model, input_ids, mask, cfg, max_new_tokens, [tokenizer.eos_id],
                   generator=generator, is_done=done, on_token=on_token, decoding=decoding, **extra)
    return [(s.row, s.tokens, s.score) for s in seqs]


def generators(seed: int | Sequence[int] | None, rows: int,
               decoding: DecodeOptions | None) -> torch.Generator | list[torch.Generator] | None:
    """One generator for the batch (an int seed), one per row (a list of seeds), or None (torch's global one)."""
    if seed is None or isinstance(seed, int):
        return torch.Generator().manual_seed(seed) if seed is not None else None
    if len(seed) != rows:
        raise XLabError(f"{len(seed)} seeds for {rows} prompts: give one seed per prompt")
    if decoding is not None and decoding.draft is not None:
        raise XLabError("one seed per prompt does not work with a draft model (speculative decoding)")
    return [torch.Generator().manual_seed(s) for s in seed]


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    sampler: str | SamplerConfig | dict = "greedy",
    max_new_tokens: int = 50,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    decoding: DecodeOptions | None = None,
    **options: object,
) -> list[Generation]:
    """Continue each prompt (sos is prepended) with the chosen sampler. Beam search returns
    num_return_sequences generations per prompt, best first; the others one per prompt.
    Prompts longer than the context keep their last max_len - 1 tokens (with a warning). For speed, convert the
    model with xlab.generation.fast.for_inference(model, "int8") and pass decoding=DecodeOptions(compile=True)."""
    cfg = sampler_config(sampler, **options)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [tokenizer.encode(p) for p in prompts]
    results = []
    for row, tokens, score in generate_ids(model, tokenizer, ids, cfg, max_new_tokens, seed, on_token,
                                            decoding):
        text, _ = cut_at_stop(tokenizer.decode(tokens), cfg.stop)
        results.append(Generation(prompts[row], text, tokens, score))
    return results


@dataclass
class Loaded:
    """A checkpoint ready to decode: its model (converted as dtype says), tokenizer and decoding options."""

    ckpt: Checkpoint
    model: XLabModel
    tokenizer: XLabTokenizer
    decoding: DecodeOptions
    dtype: str  # what decoding computes in (resolved: never auto)


def load_for_decoding(path: str | Path | Checkpoint, device: torch.device, dtype: str = "auto", compile: str = "auto",
                      cache: str = "auto", draft: str | None = None, draft_tokens: int = 4,
                      announce: bool = True) -> Loaded:
    """The checkpoint's model and tokenizer, the model converted for decoding as dtype/compile/cache say (and a
    draft model for speculative decoding); prints the path taken on stderr (stdout stays parseable)."""
    ckpt = Checkpoint.of(path)
    tokenizer = XLabDataModule.load_from_checkpoint(ckpt).tokenizer  # its data config checked too
    name, decoding = plan(dtype, compile, cache, device)
    model = for_inference(XLabModel.load_from_checkpoint(ckpt, map_location=device), name)
    speculative = ""
    if draft is not None:  # speculation runs both models eagerly over static caches (xlab/generation/speculative.py)
        decoding.static, decoding.compile = True, False
        decoding.draft, decoding.draft_tokens = load_draft(draft, model, tokenizer, device, name), draft_tokens
        speculative = f", speculative with draft={draft} ({draft_tokens} tokens per target forward)"
    if announce:
        print(describe(name, decoding, device) + speculative, file=sys.stderr, flush=True)
    return Loaded(ckpt, model, tokenizer, decoding, name)


def load_draft(path: str | Path, target: XLabModel, tokenizer: XLabTokenizer, device: torch.device,
               dtype: str) -> XLabModel:
    """A draft checkpoint for speculative decoding: it must share the target's tokenizer and context."""
    ckpt = Checkpoint.of(path)
    if XLabDataModule.load_from_checkpoint(ckpt).tokenizer.tokenizer.get_vocab() != tokenizer.tokenizer.get_vocab():
        raise XLabError(f"draft={path!r} has another tokenizer than ckpt: the draft must share the target's")
    model = for_inference(XLabModel.load_from_checkpoint(ckpt, map_location=device), dtype)
    check_draft(target, model)
    return model
