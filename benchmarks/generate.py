"""Decoding throughput: XLab's KV-cached samplers vs transformers' generate on the same weights.

Greedy and beam-4, batch 1 and 8, 200 new tokens after a 16-token prompt (eos disabled via min_new_tokens, so every
run generates the full length). Model: the GPT-2 architecture at 6 layers, d_model 384, 6 heads, vocab 8192 by
default; the peer is the GPT2LMHeadModel holding the same weights. Prints a Markdown table with tok/s and ratios.

    python benchmarks/generate.py
    python benchmarks/generate.py --arch llama --new-tokens 100 --repeats 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from xlab.config import SamplerConfig
from xlab.models import XLabModel
from xlab.models.hf import to_hf_model
from xlab.sampling import SAMPLERS

ARCHS = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": {},  # the model's defaults: RoPE, RMSNorm, SwiGLU, no biases, untied head
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="gpt2")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = XLabModel(args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                      max_len=args.prompt_tokens + args.new_tokens, **ARCHS[args.arch]).eval()
    eos = 1
    hf = to_hf_model(model, {"eos": eos, "pad": 0}).to(args.device)
    model = model.to(args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    print(f"# {where}, torch {torch.__version__}, fp32; "
          f"{args.arch} {args.layers}x{args.d_model}, vocab {args.vocab}; {args.new_tokens} new tokens; "
          f"median of {args.repeats}")
    print("| decoding | batch | XLab tok/s | transformers tok/s | XLab/transformers |")
    print("|---|---|---|---|---|")
    n = args.new_tokens
    for name, beams in (("greedy", 1), ("beam-4", 4)):
        for batch in args.batches:
            ids = torch.randint(2, args.vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
            ids = ids.to(args.device)
            mask = torch.ones_like(ids)
            cfg = SamplerConfig(name="beam" if beams > 1 else "greedy", num_beams=max(beams, 1), min_new_tokens=n)

            decoder = SAMPLERS.get(cfg.name)

            def ours(decoder=decoder, ids=ids, mask=mask, cfg=cfg) -> None:
                with torch.inference_mode():
                    out = decoder(model, ids, mask, cfg, n, [eos], sampling=False)
                assert all(len(s.tokens) == n for s in out)

            def theirs(ids=ids, mask=mask, beams=beams) -> None:
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=beams, eos_token_id=eos, pad_token_id=0)
                assert out.shape[1] == args.prompt_tokens + n

            ours_s, theirs_s = timed(ours, args.repeats), timed(theirs, args.repeats)
            tokens = batch * n
            print(f"| {name} | {batch} | {tokens / ours_s:,.0f} | {tokens / theirs_s:,.0f} | "
                  f"{theirs_s / ours_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
