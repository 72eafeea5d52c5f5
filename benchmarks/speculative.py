"""Speculative decoding on trained checkpoints: the target alone against the target with a draft, taking turns.

Prompts are the first --prompt-tokens tokens of held-out documents (the predict split), decoded one at a time
(batch 1, where speculation is meant to help). Greedy outputs are checked identical to the target's; for sampling
the table shows speed only (exactness is tested statistically in tests/test_speculative.py). Reports tok/s, the
speed-up, the share of draft tokens accepted and tokens per target forward.

    python -m xlab.train logger=none hydra.run.dir=/tmp/spec/target
    python -m xlab.train logger=none model.n_layer=1 model.d_model=128 model.n_head=2 hydra.run.dir=/tmp/spec/draft
    python benchmarks/speculative.py --target /tmp/spec/target/checkpoints/last --draft /tmp/spec/draft/checkpoints/last
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from xlab.data.predict import split_prompts
from xlab.datamodules import XLabDataModule
from xlab.generation.api import generate_ids
from xlab.generation.config import SamplerConfig
from xlab.generation.fast import DecodeOptions, for_inference
from xlab.models import XLabModel

SAMPLERS = {"greedy": SamplerConfig(name="greedy", temperature=0.0),
            "top_k": SamplerConfig(name="top_k", temperature=0.8, top_k=50)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    ap.add_argument("--repeats", type=int, default=2)
    return ap.parse_args()


def load(path: str, dtype: str) -> XLabModel:
    return for_inference(XLabModel.load_from_checkpoint(path), dtype)


def run(model, tokenizer, prompts, cfg, n, options) -> tuple[float, list]:
    """Seconds to decode every prompt alone, and the generated ids."""
    start, out = time.perf_counter(), []
    for i, prompt in enumerate(prompts):
        out += [t for _, t, _ in generate_ids(model, tokenizer, [prompt], cfg, n, seed=i, decoding=options)]
    return time.perf_counter() - start, out


def compare(args, target, draft, tokenizer, prompts, name: str) -> None:
    cfg = SAMPLERS[name]
    modes = {"target alone": None} | {f"draft, k={k}": k for k in args.draft_tokens}
    times = {m: [] for m in modes}
    stats, outputs = {}, {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for mode, k in modes.items():
            options = None if k is None else DecodeOptions(static=True, draft=draft, draft_tokens=k)
            seconds, outputs[mode] = run(target, tokenizer, prompts, cfg, args.new_tokens, options)
            times[mode].append(seconds)
            stats[mode] = options.stats if options is not None else {}
    base = statistics.median(times["target alone"][1:])
    for mode in modes:
        s = statistics.median(times[mode][1:])
        tokens = sum(len(t) for t in outputs[mode])
        st = stats[mode]
        rate = f"{100 * st['accepted'] / st['drafted']:.0f}%" if st.get("drafted") else "-"
        per_forward = f"{(st['accepted'] + st['rounds']) / st['rounds']:.2f}" if st.get("rounds") else "1.00"
        print(f"| {name} | {mode} | {tokens / s:,.1f} | {base / s:.2f} | {rate} | {per_forward} |", flush=True)
        if name == "greedy" and mode != "target alone":
            assert outputs[mode] == outputs["target alone"], f"{mode}: greedy output differs from the target's"


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    datamodule = XLabDataModule.load_from_checkpoint(args.target)
    tokenizer = datamodule.tokenizer
    prompts = [p.prompt_ids for p in split_prompts(datamodule.tokens("predict"), tokenizer, args.prompts,
                                                   args.prompt_tokens, args.new_tokens)]
    target, draft = load(args.target, args.dtype), load(args.draft, args.dtype)
    size = {m: sum(p.numel() for p in x.parameters()) / 1e6 for m, x in (("target", target), ("draft", draft))}
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}; "
          f"target {size['target']:.1f}M params, draft {size['draft']:.1f}M; {len(prompts)} predict-split prompts "
          f"of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, batch 1; median of {args.repeats}")
    print("| sampler | decoding | tok/s | speed-up | draft tokens accepted | tokens per target forward |")
    print("|---|---|---|---|---|---|")
    for name in args.samplers:
        compare(args, target, draft, tokenizer, prompts, name)
    print("- greedy: every speculative output identical to the target's")


if __name__ == "__main__":
    main()
