"""Causal attention forward + backward: SDPA (PyTorch picks the kernel: flash on CPU) against XLab's eager path
(matmul + softmax, `model.attn_impl=eager`), the measurement behind `attn_impl=auto` (xlab/models/ops.py).

    python benchmarks/attention.py                       # bf16 and fp32, batch x heads x context as below
    python benchmarks/attention.py --shapes 8x6x256 2x12x1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from xlab.models.ops import eager_attention
from xlab.runtime import keep_freed_memory


def fwd_bwd_ms(fn, b: int, h: int, t: int, d: int, dtype: torch.dtype, steps: int) -> float:
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, t, d, dtype=dtype)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8x6x256", "8x12x128", "4x6x512", "2x6x1024"],
                    help="batch x heads x context; head dim --head-dim")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    keep_freed_memory()
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
