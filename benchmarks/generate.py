"""Decoding throughput: every XLab decoding mode vs transformers' fastest generate on the same weights.

Decodings: greedy batch 1 and 8, beam-4 batch 1; a 16-token prompt and 200 new tokens (eos disabled through
min_new_tokens, so every run generates the full length). XLab modes: fp32, bf16 and int8 (generation/fast.py)
x dynamic cache / static cache with eager steps / static cache with a compiled step (DecodeOptions). The peers are
transformers' GPT2LMHeadModel holding the same weights (xlab.models.hf.to_hf_model) in fp32 and bf16, eager with its
dynamic cache and with its static cache + torch.compile path (generate compiles greedy decoding only: its beam
search runs that row's steps eagerly, and the step column says so). "vs fastest peer" = tok/s over the fastest
transformers row at the same (decoding, batch).

Taking turns: for each (decoding, batch), one warm-up call per mode, then --repeats rounds of every mode in turn;
each row is the median of its rounds. Compiled rows: compile s = warm-up time - median time, and break-even tokens =
compile s / (1/tok_s(static eager, same dtype) - 1/tok_s(compiled)), "never" when compiling is not faster.

bandwidth util = bytes read per decoding step x steps/s / the copy bandwidth measured in the same run (dst.copy_(src)
of --copy-mb of fp32, best of 10, counting read + write). Bytes per step = the weights in the row's dtype (int8:
int8 weights + scales; embedding tables only where the head shares them, tied in gpt2) + the KV cache at the mean
context length (2 x layers x rows x heads x context x head_dim x element size; beam rows = batch x beams).

    python benchmarks/generate.py                                    # both shapes, every mode (tens of minutes)
    python benchmarks/generate.py --shape small --repeats 3
    python benchmarks/generate.py --shape gpt2_small --repeats 2 --new-tokens 100
    python benchmarks/generate.py --modes dynamic static --dtypes fp32 int8      # no compiling
    python benchmarks/generate.py --shape custom --layers 1 --d-model 32 --heads 2 --vocab 64 --new-tokens 4
    python benchmarks/generate.py --device cuda --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from xlab.generation.config import SamplerConfig
from xlab.generation.fast import DTYPES, DecodeOptions, Int8Linear, for_inference
from xlab.generation.sampling import SAMPLERS
from xlab.models import XLabModel
from xlab.models.hf import to_hf_model

ARCHS = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": {"mlp": "swiglu"},  # otherwise the model's defaults: RoPE, RMSNorm, no biases, untied head
}
SHAPES = {  # layers, d_model, heads, vocab
    "small": (6, 384, 6, 8192),
    "gpt2_small": (12, 768, 12, 32768),
    "custom": (6, 384, 6, 8192),  # small, for --layers/--d-model/--heads/--vocab to change
}
MODES = {"dynamic": ("dynamic", "eager"), "static": ("static", "eager"), "compiled": ("static", "compiled")}
DECODINGS = (("greedy", 1), ("beam-4", 4))  # name, beams
EOS, PAD = 1, 0
NOTES: list[str] = []  # lines printed under a shape's table (its rows print as each (decoding, batch) ends)


def note(line: str) -> None:
    NOTES.append(f"- {line}")


@dataclass
class Mode:
    """One way of decoding: XLab (a converted model + DecodeOptions) or transformers (a GPT2LMHeadModel)."""

    impl: str  # XLab | transformers
    dtype: str
    cache: str  # dynamic | static
    step: str  # eager | compiled
    model: nn.Module
    compiles: list = field(default_factory=lambda: [0])  # transformers: calls of get_compiled_call

    @property
    def label(self) -> str:
        return f"{self.impl} {self.dtype} {self.cache} {self.step}"


@dataclass
class Result:
    mode: Mode
    first_s: float  # the warm-up call
    tokens: list[list[int]]  # generated ids of each returned sequence (the warm-up's)
    compiled: bool  # the steps did run compiled
    times: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, nargs="+", default=["small", "gpt2_small"])
    ap.add_argument("--arch", choices=ARCHS, default="gpt2")
    ap.add_argument("--layers", type=int, help="override the shape's")
    ap.add_argument("--d-model", type=int, help="override the shape's")
    ap.add_argument("--heads", type=int, help="override the shape's")
    ap.add_argument("--vocab", type=int, help="override the shape's")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="greedy's")
    ap.add_argument("--beam-batches", type=int, nargs="*", default=[1], help="beam-4's (none: no beam rows)")
    ap.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    ap.add_argument("--dtypes", choices=["fp32", "bf16", "int8"], nargs="+", default=["fp32", "bf16", "int8"])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of taking turns; rows are their medians")
    ap.add_argument("--copy-mb", type=int, default=256, help="size of the bandwidth probe's fp32 tensor")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def copy_bandwidth(device: torch.device, mb: int, tries: int = 10) -> float:
    """Bytes/s of dst.copy_(src) for an fp32 tensor of `mb` MB (read + write), best of `tries`."""
    src = torch.rand(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = float("inf")
    for _ in range(tries):
        start = clock(device)
        dst.copy_(src)
        best = min(best, clock(device) - start)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decoding step reads of the weights: every parameter (and Int8Linear's int8 weight and scales) once;
    an embedding table only when a non-embedding module (a tied head) reads it too: otherwise one row per token."""
    not_embedding = {id(t) for m in model.modules() if not isinstance(m, nn.Embedding)
                     for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    seen, total = set(), 0
    for m in model.modules():
        tensors = [*m.parameters(recurse=False), *(m.buffers(recurse=False) if isinstance(m, Int8Linear) else [])]
        for t in tensors:
            if id(t) in seen or (isinstance(m, nn.Embedding) and id(t) not in not_embedding):
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def kv_bytes(model: XLabModel, rows: int, context: float, element_size: int) -> float:
    """Bytes of keys and values attention reads per step at `context` cached tokens, all layers."""
    c = model.cfg
    return 2 * c.n_layer * rows * (c.n_kv_head or c.n_head) * context * (c.d_model // c.n_head) * element_size


def build_model(args: argparse.Namespace, shape: str, device: torch.device) -> XLabModel:
    layers, d_model, heads, vocab = SHAPES[shape]
    layers, d_model = args.layers or layers, args.d_model or d_model
    heads, vocab = args.heads or heads, args.vocab or vocab
    torch.manual_seed(0)
    return XLabModel(vocab, n_layer=layers, n_head=heads, d_model=d_model,
                     max_len=args.prompt_tokens + args.new_tokens, **ARCHS[args.arch]).eval().to(device)


def xlab_modes(model: XLabModel, args: argparse.Namespace) -> list[Mode]:
    modes = []
    for dtype in args.dtypes:
        converted = for_inference(copy.deepcopy(model), dtype)
        modes += [Mode("XLab", dtype, *MODES[name], converted) for name in args.modes]
    return modes


def peer_modes(model: XLabModel, args: argparse.Namespace, device: torch.device) -> list[Mode]:
    """transformers in fp32 and bf16 (those of --dtypes): eager with its dynamic cache (--modes dynamic or static),
    and with its static cache + compiled step (--modes compiled). A mode that cannot be built is skipped."""
    from transformers import CompileConfig

    kinds = ([("dynamic", "eager")] if {"dynamic", "static"} & set(args.modes) else []) + \
        ([("static", "compiled")] if "compiled" in args.modes else [])
    wanted = [(dtype, cache, step) for dtype in ("fp32", "bf16") if dtype in args.dtypes for cache, step in kinds]
    modes = []
    for dtype, cache, step in wanted:
        mode = Mode("transformers", dtype, cache, step, None)
        try:
            hf = to_hf_model(model, {"eos": EOS, "pad": PAD}).to(device, DTYPES[dtype])
            if step == "compiled":
                hf.generation_config.cache_implementation = "static"
                cfg = CompileConfig(fullgraph=True, dynamic=False,
                                    mode="reduce-overhead" if device.type == "cuda" else "default")
                cfg._compile_all_devices = True  # generate compiles on GPUs only unless told
                hf.generation_config.compile_config = cfg
                hf.get_compiled_call = counted(hf.get_compiled_call, mode.compiles)
            mode.model = hf
            modes.append(mode)
        except Exception as exc:  # noqa: BLE001 - one line, then the other modes
            note(f"{mode.label}: failed to build ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); skipped")
    return modes


def counted(fn: Callable, counter: list) -> Callable:
    def wrapper(*a, **kw):
        counter[0] += 1
        return fn(*a, **kw)
    return wrapper


def decode(mode: Mode, options: DecodeOptions | None, ids: torch.Tensor, cfg: SamplerConfig,
           n: int) -> list[list[int]]:
    """One call of the mode's decoder on prompts `ids`: the generated ids of each returned sequence."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if mode.impl == "XLab":
            out = SAMPLERS.get(cfg.name)(mode.model, ids, mask, cfg, n, [EOS], sampling=False, decoding=options)
            tokens = [s.tokens for s in out]
        else:
            out = mode.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=cfg.num_beams if cfg.name == "beam" else 1, eos_token_id=EOS,
                                      pad_token_id=PAD)
            tokens = out[:, ids.shape[1]:].tolist()
    assert all(len(t) == n for t in tokens), f"{mode.label}: not {n} tokens per sequence"
    return tokens


def failed(mode: Mode, exc: Exception) -> None:
    note(f"{mode.label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); skipped")


def warm_up(modes: list[Mode], ids: torch.Tensor, cfg: SamplerConfig, n: int) -> list[tuple[Result, Callable]]:
    """One call per mode (compiled modes compile here); a mode that raises is reported and dropped."""
    runs = []
    for mode in modes:
        options = None if mode.cache == "dynamic" else DecodeOptions(static=True, compile=mode.step == "compiled")
        calls = mode.compiles[0]
        try:
            start = clock(ids.device)
            tokens = decode(mode, options, ids, cfg, n)
            first = clock(ids.device) - start
        except Exception as exc:  # noqa: BLE001
            failed(mode, exc)
            continue
        compiled = options.compile if mode.impl == "XLab" and options else mode.compiles[0] > calls
        if mode.step == "compiled" and not compiled:
            note(f"{mode.label}: the steps ran eagerly ({cfg.name} batch {ids.shape[0]})")
        runs.append((Result(mode, first, tokens, compiled),
                     lambda mode=mode, options=options: decode(mode, options, ids, cfg, n)))
    return runs


def take_turns(runs: list[tuple[Result, Callable]], repeats: int, device: torch.device) -> list[Result]:
    """--repeats rounds of every mode in turn, so the machine's noise hits them all alike."""
    dropped = set()
    for _ in range(repeats):
        for i, (result, call) in enumerate(runs):
            if i in dropped:
                continue
            try:
                start = clock(device)
                call()
                result.times.append(clock(device) - start)
            except Exception as exc:  # noqa: BLE001
                failed(result.mode, exc)
                dropped.add(i)
    return [r for i, (r, _) in enumerate(runs) if i not in dropped]


def check_tokens(results: list[Result], decoding: str, batch: int) -> None:
    """Greedy: every XLab fp32 mode decodes transformers fp32's tokens exactly; the other dtypes' agreement with
    them, as the fraction of equal tokens."""
    if decoding != "greedy":
        return
    ref = next((r.tokens for r in results if (r.mode.impl, r.mode.dtype, r.mode.cache) ==
                ("transformers", "fp32", "dynamic")), None)
    if ref is None:
        return
    xlab_fp32 = [r for r in results if r.mode.impl == "XLab" and r.mode.dtype == "fp32"]
    for r in xlab_fp32:
        assert r.tokens == ref, f"{r.mode.label} decodes other tokens than transformers fp32 ({decoding} b{batch})"
    if xlab_fp32:
        note(f"tokens: XLab fp32 == transformers fp32 ({decoding} batch {batch}: "
             f"{', '.join(f'{r.mode.cache} {r.mode.step}' for r in xlab_fp32)})")
    flat = [t for row in ref for t in row]
    agree = [f"{r.mode.label} {sum(a == b for a, b in zip(flat, [t for row in r.tokens for t in row])) / len(flat):.2f}"
             for r in results if r.mode.dtype != "fp32"]
    if agree:
        note(f"greedy batch {batch}, fraction of tokens equal to fp32's: {'; '.join(agree)}")


def compile_cells(r: Result, results: list[Result], tokens: int) -> tuple[str, str]:
    """compile s and break-even tokens of a compiled row, against the same impl and dtype's eager static cache
    (transformers: its eager dynamic cache, the only eager peer)."""
    if not r.compiled:
        return "-", "-"
    cost = r.first_s - r.median_s
    eager = sorted((x for x in results if (x.mode.impl, x.mode.dtype, x.mode.step) ==
                    (r.mode.impl, r.mode.dtype, "eager")), key=lambda x: x.mode.cache != "static")
    if not eager:
        return f"{cost:.1f}", "-"
    saved_per_token = (eager[0].median_s - r.median_s) / tokens  # 1/tok_s(eager) - 1/tok_s(compiled)
    return f"{cost:.1f}", f"{cost / saved_per_token:,.0f}" if saved_per_token > 0 else "never"


def table_rows(results: list[Result], model: XLabModel, decoding: str, batch: int, beams: int,
               args: argparse.Namespace, bandwidth: float) -> list[str]:
    """The Markdown rows of one (decoding, batch): tok/s, ratio to the fastest peer, bandwidth utilisation."""
    n = args.new_tokens
    tokens = batch * n
    peers = [tokens / r.median_s for r in results if r.mode.impl == "transformers"]
    fastest = max(peers, default=None)
    context = args.prompt_tokens + n / 2  # mean cached tokens over the decoding steps
    rows = []
    for r in results:
        tok_s = tokens / r.median_s
        element = next(p for p in r.mode.model.parameters()).element_size()  # KV cache: the activations' dtype
        per_step = weight_bytes(r.mode.model) + kv_bytes(model, batch * beams, context, element)
        util = per_step * (n / r.median_s) / bandwidth
        step = r.mode.step if r.compiled or r.mode.step == "eager" else "not compiled"
        ratio = f"{tok_s / fastest:.2f}" if fastest else "-"
        compile_s, break_even = compile_cells(r, results, tokens)
        rows.append(f"| {decoding} | {batch} | {r.mode.impl} | {r.mode.dtype} | {r.mode.cache} | {step} | "
                    f"{tok_s:,.0f} | {ratio} | {100 * util:.1f}% | {compile_s} | {break_even} |")
    return rows


def run_group(modes: list[Mode], model: XLabModel, decoding: str, beams: int, batch: int,
              args: argparse.Namespace, bandwidth: float) -> list[str]:
    """One (decoding, batch): warm-ups, the token check, the rounds taken in turns; its table rows."""
    device, n = model.device, args.new_tokens
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.hparams["vocab_size"], (batch, args.prompt_tokens), generator=generator).to(device)
    cfg = SamplerConfig(name="beam" if beams > 1 else "greedy", num_beams=beams, min_new_tokens=n)
    start = time.perf_counter()
    runs = warm_up(modes, ids, cfg, n)
    check_tokens([r for r, _ in runs], decoding, batch)
    results = take_turns(runs, args.repeats, device)
    note(f"{decoding} batch {batch}: {len(results)} modes, a warm-up and {args.repeats} round(s) each in "
         f"{time.perf_counter() - start:.0f} s")
    return table_rows(results, model, decoding, batch, beams, args, bandwidth)


def run_shape(args: argparse.Namespace, shape: str, device: torch.device, bandwidth: float) -> None:
    model = build_model(args, shape, device)
    c = model.cfg
    print(f"\n## {shape}: {args.arch} {c.n_layer}x{c.d_model}, {c.n_head} heads, vocab {model.hparams['vocab_size']}, "
          f"{model.num_params() / 1e6:.2f}M params; {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens; "
          f"median of {args.repeats} round(s) taken in turns\n", flush=True)
    modes = xlab_modes(model, args) + peer_modes(model, args, device)
    print("| decoding | batch | impl | dtype | cache | step | tok/s | vs fastest peer | bandwidth util | compile s | "
          "break-even tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for decoding, beams in DECODINGS:
        for batch in args.batches if beams == 1 else args.beam_batches:
            print("\n".join(run_group(modes, model, decoding, beams, batch, args, bandwidth)), flush=True)
    print("\n" + "\n".join(NOTES), flush=True)
    NOTES.clear()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name or platform.processor()} ({platform.machine()}), {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    import transformers

    args = parse_args(argv)
    device = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    torch._dynamo.config.recompile_limit = 64  # a graph per (model, batch): 3 dtypes x 3 decodings x shapes
    bandwidth = copy_bandwidth(device, args.copy_mb)
    print(f"# {machine(device)}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{datetime.date.today()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    for shape in args.shape:
        run_shape(args, shape, device, bandwidth)


if __name__ == "__main__":
    main()
