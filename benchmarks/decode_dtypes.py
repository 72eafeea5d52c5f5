"""Batch-1 greedy decoding of XLab's model in fp32 and in bf16, taking turns in one process: what `dtype=auto`'s
rule (bf16 where the CPU has AMX/AVX512-BF16, xlab.device.auto_precision) costs or buys on this CPU.

    python benchmarks/decode_dtypes.py
"""

from __future__ import annotations

import copy
import time

import torch

from xlab.generation.config import SamplerConfig
from xlab.generation.fast import for_inference
from xlab.generation.sampling import decode_tokens
from xlab.models import XLabModel

SHAPES = [(6, 384, 6, 8192), (12, 768, 12, 32768)]  # layers, d_model, heads, vocab: benchmarks/generate.py's two


def main(new_tokens: int = 64, rounds: int = 3) -> None:
    torch.manual_seed(0)
    for layers, d_model, heads, vocab in SHAPES:
        base = XLabModel(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=d_model, max_len=256)
        base = base.eval().requires_grad_(False)
        models = {dtype: for_inference(copy.deepcopy(base), dtype) for dtype in ("fp32", "bf16")}
        ids = torch.randint(0, vocab, (1, 16))
        best = dict.fromkeys(models, float("inf"))
        for _ in range(rounds):  # taking turns: the machine's speed and load cancel out of the ratio
            for dtype, model in models.items():
                start = time.perf_counter()
                decode_tokens(model, ids, torch.ones_like(ids), SamplerConfig(name="greedy", temperature=0.0),
                              new_tokens, [], None)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
        print(f"{layers}x{d_model}: fp32 {new_tokens / best['fp32']:.1f} tok/s, bf16 {new_tokens / best['bf16']:.1f} "
              f"tok/s, bf16/fp32 {best['fp32'] / best['bf16']:.2f}x")


if __name__ == "__main__":
    main()
