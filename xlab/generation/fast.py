"""The fast decoding path: a static KV cache, a compiled one-token step, and the dtype decoding runs in.

The samplers (xlab/generation/sampling.py) feed tokens through a stepper. `Stepper` there grows a dynamic cache; the
`StaticStepper` here writes into a StaticKVCache of fixed shape, so every one-token step has the same shapes and
torch.compile builds it once per (batch, cache size) bucket instead of per prompt length. Prefill (the prompt,
and the window after the context slides) runs eagerly over the same cache.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from xlab.device import auto_precision
from xlab.errors import XLabError
from xlab.models.transformer import StaticKVCache, XLabModel

MIN_CACHE = 64  # the smallest cache bucket: short runs share one compiled step


@dataclass
class DecodeOptions:
    """How the samplers run the model: static cache or not, compiled step or not, and a draft model for
    speculative decoding (xlab/generation/speculative.py; greedy and sampling)."""

    static: bool = True
    compile: bool = False
    draft: XLabModel | None = None  # a smaller model with the target's tokenizer
    draft_tokens: int = 4  # tokens the draft proposes per target forward
    stats: dict = field(default_factory=dict)  # filled while decoding: compile seconds, steps, drafted/accepted


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """dtype=auto|fp32|bf16|fp16|int8 → the one decoding runs in; auto is training's rule (xlab.device)."""
    return str(auto_precision(device)) if dtype == "auto" else dtype


class Int8Linear(nn.Module):
    """Weight-only int8 linear: int8 weights with one fp scale per output row, multiplied by PyTorch's
    _weight_int8pack_mm kernel (CPU, CUDA, MPS; the one torchao and gpt-fast call), activations in bf16. A
    quarter of fp32's bytes per weight: decoding reads every weight once per token, so it runs ~4x less memory."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def for_inference(model: XLabModel, dtype: str = "auto") -> XLabModel:
    """Convert `model` in place for decoding in dtype (auto|fp32|bf16|fp16|int8; see resolve_dtype). int8 keeps
    the embedding in bf16 and swaps every linear (the head too) for an Int8Linear: for sampling, not training."""
    name = resolve_dtype(dtype, model.device)
    if name not in (*DTYPES, "int8"):
        raise XLabError(f"dtype={dtype!r}; valid: auto, {', '.join(DTYPES)}, int8")
    model.eval().requires_grad_(False)
    if name != "int8":
        return model.to(DTYPES[name])
    act = torch.bfloat16
    model.to(act)
    linears = [(parent, key, child) for parent in model.modules() for key, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, key, child in linears:
        setattr(parent, key, Int8Linear(child, act))
    return model


def plan(dtype: str, compile: str, cache: str, device: torch.device) -> tuple[str, DecodeOptions]:
    """generate's dtype/compile/cache keys (xlab/generate.py) → the dtype and the options decoding runs with.
    compile=auto is on for CUDA only: on a CPU the compile takes ~20-30 s, which pays after ~10k tokens."""
    name = resolve_dtype(str(dtype), device)
    compiled = {"on": True, "off": False}.get(str(compile), device.type == "cuda")
    if compiled and str(cache) == "dynamic":
        raise XLabError("compile=on with cache=dynamic: the compiled step needs the fixed shapes of cache=static "
                        "(or cache=auto)")
    return name, DecodeOptions(static=str(cache) == "static" or (str(cache) == "auto" and compiled),
                               compile=compiled)


def describe(dtype: str, options: DecodeOptions, device: torch.device) -> str:
    """The start-up line naming the path decoding takes."""
    graphs = " with CUDA graphs" if device.type == "cuda" else ""
    step = f"compiled one-token step{graphs}" if options.compile else "eager steps"
    cache = "static" if options.static else "dynamic"
    return f"decoding: {dtype} on {device}, {cache} KV cache, {step}"


def cache_size(max_len: int, total: int) -> int:
    """The cache bucket for sequences of `total` tokens: a power of two ≥ MIN_CACHE, at most max_len."""
    size = MIN_CACHE
    while size < total:
        size *= 2
    return min(size, max_len)


def _one_token(model: XLabModel, ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    return model(ids, cache)[:, -1].float()


_compiled = {}  # one torch.compile wrapper per device type; it keeps a graph per (model, batch, cache size)


def compiled_step(device: torch.device):
    if device.type not in _compiled:
        # CUDA graphs (reduce-overhead) replay the step without launching each kernel from Python; on a CPU there
        # is no launch cost to save, and the default mode's fused kernels are what pays.
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[device.type] = torch.compile(_one_token, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[device.type]


class StaticStepper:
    """Stepper's interface (xlab/generation/sampling.py) over a StaticKVCache sized for `total` tokens; one-token steps
    run compiled when options.compile is set (falling back to eager, with one warning, if compiling fails)."""

    def __init__(self, model: XLabModel, mask: torch.Tensor, total: int, options: DecodeOptions) -> None:
        self.model, self.options = model, options
        self.cache = StaticKVCache(model, mask.shape[0], cache_size(model.max_len, total))
        self.filled = 0  # tokens in the cache (host-side: the compiled step must not read it)
        self.start = 0  # column of the sequences where the cached window begins
        self.padded = not bool(mask.all())
        self.compile = options.compile
        self.first = True
        self.ids = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)  # the step's fixed input
        options.stats.setdefault("steps", 0)

    def __call__(self, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n_new = seqs.shape[1] - self.start - self.filled
        if self.filled + n_new > self.cache.size:  # the context is full: slide the window (only at max_len)
            self.start = seqs.shape[1] - (self.model.max_len - 1)
            self.cache = StaticKVCache(self.model, seqs.shape[0], self.cache.size)
            self.filled, n_new = 0, self.model.max_len - 1
        self.filled += n_new
        if n_new == 1:
            return self.step(seqs[:, -1:])
        chunk_mask = mask[:, -n_new:] if self.padded else None
        return self.model.head(self.model.hidden(seqs[:, -n_new:], self.cache, chunk_mask)[:, -1]).float()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.options.stats["steps"] += 1
        ids = self.ids.copy_(ids)  # one layout every step (a column of seqs has strides that change)
        if not self.compile:
            return _one_token(self.model, ids, self.cache)
        first, self.first = self.first, False
        started = time.perf_counter()
        try:
            logits = compiled_step(ids.device)(self.model, ids, self.cache)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: decode eagerly instead
            warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); decoding eagerly", stacklevel=2)
            self.compile = self.options.compile = False  # it failed before running: the cache is untouched
            return _one_token(self.model, ids, self.cache)
        if first:  # a new (batch, cache size) compiles here; a seen one only checks its guards
            self.options.stats["first_step_s"] = self.options.stats.get("first_step_s", 0.0) + (
                time.perf_counter() - started)
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)
