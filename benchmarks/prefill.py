"""Prefill cost of the head: a prompt's logits at every position (what `model(ids, cache)` computes) against the
last position only (`model.head(model.hidden(ids, cache)[:, -1])`, what the decoding steppers now run), taking turns
in one process; median of --repeats after a warm-up. Random weights (speed does not depend on them).

    python benchmarks/prefill.py --prompt-tokens 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xlab.models import XLabModel
from xlab.models.transformer import KVCache

SHAPES = {"small": (6, 384, 6, 8192), "gpt2_small": (12, 768, 12, 32768)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), nargs="+", default=list(SHAPES))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| shape | prompt tokens | every position ms | last position ms | speed-up |\n|---|---|---|---|---|")
    for name in args.shape:
        every, last = measure(name, args.prompt_tokens, args.repeats)
        print(f"| {name} | {args.prompt_tokens} | {every:.0f} | {last:.0f} | {every / last:.2f}x |")


def measure(name: str, prompt_tokens: int, repeats: int) -> tuple[float, float]:
    """Median ms of a prefill with the head at every position, and at the last only."""
    layers, d, heads, vocab = SHAPES[name]
    torch.manual_seed(0)
    model = XLabModel(vocab, n_layer=layers, d_model=d, n_head=heads, max_len=prompt_tokens).eval()
    ids = torch.randint(0, vocab, (1, prompt_tokens))
    runs = {"every": lambda c: model(ids, c)[:, -1], "last": lambda c: model.head(model.hidden(ids, c)[:, -1])}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for key, run in runs.items():
                start = time.perf_counter()
                run(KVCache(model, 1))
                if i:  # the first round warms up
                    times[key].append(time.perf_counter() - start)
    return statistics.median(times["every"]) * 1e3, statistics.median(times["last"]) * 1e3


if __name__ == "__main__":
    main()
