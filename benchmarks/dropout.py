"""Dropout forward + backward on a CPU: torch's F.dropout against xlab.models.ops.fast_dropout (the model's Dropout
modules and eager attention take it on CPUs), the variants taking turns in one process; `x * 1.0` as the floor.

    python benchmarks/dropout.py                     # the default model's attention probabilities and residual stream
    python benchmarks/dropout.py --shapes 16x4x256x256 --dtype fp32 --p 0.2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from xlab.device import cpu_isa
from xlab.models.ops import fast_dropout

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16x4x256x256", "16x256x128"],
                    help="tensor shapes, dims joined by x (default: the default model's, batch 16)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    variants = {"x * 1.0": lambda x: x * 1.0, "F.dropout": lambda x: F.dropout(x, args.p),
                "fast_dropout": lambda x: fast_dropout(x, args.p)}
    print(f"{platform.processor() or platform.machine()}, ISA {cpu_isa()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}, p={args.p}; forward + backward, median of {args.steps} (ms)\n")
    print("| shape | " + " | ".join(variants) + " | F.dropout / fast_dropout |")
    print("|---|" + "---|" * (len(variants) + 1))
    for shape in args.shapes:
        x0 = torch.randn(*map(int, shape.split("x")), dtype=DTYPES[args.dtype])
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.steps + 2):  # two warm-up turns
            for name, fn in variants.items():
                x = x0.clone().requires_grad_()
                start = time.perf_counter()
                fn(x).sum().backward()
                if i >= 2:
                    times[name].append(1000 * (time.perf_counter() - start))
        ms = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {shape} | " + " | ".join(f"{v:.2f}" for v in ms.values()) +
              f" | {ms['F.dropout'] / ms['fast_dropout']:.2f}x |")


if __name__ == "__main__":
    main()
