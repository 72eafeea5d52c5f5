"""Training-step throughput of XLab model presets, optionally against transformers models of the same shape.

One step = forward + cross-entropy + backward + fused AdamW update, on random tokens. Reports the median tok/s
over the timed steps (after warm-up), and XLab/peer ratios when --hf is given (the peer is the transformers model
that computes the same function: GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, same weights).

    python benchmarks/train_throughput.py --presets gpt2_tiny llama_tiny modern_small
    python benchmarks/train_throughput.py --presets gpt2_tiny llama_tiny --set n_layer=6 d_model=384 n_head=6 \
        --vocab 8192 --hf --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from xlab.errors import XLabError
from xlab.models import XLabModel

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def preset(name: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


def step_time(model: torch.nn.Module, batch: int, seq: int, vocab: int, steps: int, warmup: int,
              dtype: torch.dtype | None, hf: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            logits = model(inputs).logits if hf else model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt2_tiny", "llama_tiny", "modern_small"])
    ap.add_argument("--set", nargs="*", default=[], help="model overrides applied to every preset, e.g. n_layer=6")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--hf", action="store_true", help="also time the transformers model of the same shape")
    args = ap.parse_args()

    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; batch {args.batch} x seq {args.seq}, vocab {args.vocab}, median of {args.steps}")
    print("| model | params | precision | XLab tok/s | peer | peer tok/s | XLab/peer |")
    print("|---|---|---|---|---|---|---|")
    for name in args.presets:
        cfg = preset(name, [f"max_len={args.seq}", *args.set])
        model = XLabModel(args.vocab, **cfg).train()
        peer = None
        if args.hf:
            from xlab.models.hf import to_hf_model

            try:
                peer = to_hf_model(model).train()
            except XLabError:
                peer = None
        for precision in args.precision:
            dtype = torch.bfloat16 if precision == "bf16" else None
            tokens = args.batch * args.seq
            ours = tokens / step_time(model, args.batch, args.seq, args.vocab, args.steps, args.warmup, dtype, False)
            row = f"| {name} | {model.num_params() / 1e6:.1f}M | {precision} | {ours:,.0f} |"
            if peer is not None:
                theirs = tokens / step_time(peer, args.batch, args.seq, args.vocab, args.steps, args.warmup, dtype,
                                            True)
                row += f" {type(peer).__name__} | {theirs:,.0f} | {ours / theirs:.2f} |"
            else:
                row += " - | - | - |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
