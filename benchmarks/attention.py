"""Causal attention forward + backward: SDPA (PyTorch picks the kernel: flash on CPU) against XLab's eager path
(matmul + softmax, `model.attn_impl=eager`), the measurement behind `attn_impl=auto` (xlab/models/ops.py).

    python benchmarks/attention.py                       # bf16 and fp32, batch x heads x context as below
    python benchmarks/attention.py --shapes 8x6x256 2x12x1024 --dtype bf16
    python benchmarks/attention.py --decode --shapes 1x12x256 8x12x256   # one query over the cache: SDPA, masked

--decode times what a decoding step's attention does (forward only, one query per row over `context` cached keys
with a boolean mask, as StaticKVCache gives it) in bf16 and fp32: the measurement behind
`xlab.models.ops.attention_dtype` (fp32 attention where a CPU's bf16 matmuls are slow).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from xlab.device import keep_freed_memory
from xlab.models.ops import eager_attention


def median_s(run, steps: int, warmup: int = 3) -> float:
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd_ms(fn, b: int, h: int, t: int, d: int, dtype: torch.dtype, steps: int) -> float:
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, t, d, dtype=dtype)
    return 1000 * median_s(lambda: fn(q, k, v).backward(grad), steps)


def decode_us(b: int, h: int, t: int, d: int, dtype: torch.dtype, steps: int) -> float:
    q = torch.randn(b, h, 1, d, dtype=dtype)
    k, v = (torch.randn(b, h, t, d, dtype=dtype) for _ in range(2))
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    return 1e6 * median_s(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), steps)


def decode_table(args) -> None:
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; one query, SDPA with a mask, head dim "
          f"{args.head_dim}, median of {args.steps}")
    print("| batch x heads x context | bf16 us | fp32 us | bf16/fp32 |")
    print("|---|---|---|---|")
    for shape in args.shapes:
        b, h, t = (int(n) for n in shape.split("x"))
        bf16, fp32 = (decode_us(b, h, t, args.head_dim, dt, args.steps) for dt in (torch.bfloat16, torch.float32))
        print(f"| {shape} | {bf16:.0f} | {fp32:.0f} | {bf16 / fp32:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8x6x256", "8x12x128", "4x6x512", "2x6x1024"],
                    help="batch x heads x context; head dim --head-dim")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode", action="store_true", help="one query over a cache, bf16 against fp32 (see above)")
    args = ap.parse_args()
    keep_freed_memory()
    if args.decode:
        return decode_table(args)
    impls = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "eager": lambda q, k, v: eager_attention(q, k, v, None, 0.0),
    }
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; causal, head dim {args.head_dim}, "
          f"median of {args.steps}")
    print("| batch x heads x context | dtype | SDPA ms | eager ms | SDPA/eager |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        b, h, t = (int(n) for n in shape.split("x"))
        for name in args.dtype:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            ms = {impl: fwd_bwd_ms(fn, b, h, t, args.head_dim, dtype, args.steps) for impl, fn in impls.items()}
            print(f"| {shape} | {name} | {ms['sdpa']:.1f} | {ms['eager']:.1f} | {ms['sdpa'] / ms['eager']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
