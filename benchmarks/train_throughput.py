"""Training-step throughput of XLab models against peers of the same shape and weights, in one run.

One step = forward + loss + backward + fused AdamW update on random tokens, each model its own way: XLab's
training path `model(x, targets=y)` (fused chunked head + cross-entropy + accuracy, see xlab/models/loss.py); the
plain PyTorch GPT of benchmarks/reference_gpt.py (nanoGPT style: SDPA is_causal, materialised logits +
F.cross_entropy; GPT-2 blocks only, `ReferenceGPT`); and the transformers model that computes the same function
(GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM; `xlab.models.hf`), `model(input_ids=x, labels=x).loss`.
Both peers start from XLab's weights (the reference's loss at init is printed beside XLab's). Medians of the timed
steps after warm-up, all models taking turns step by step; one row per peer, each with XLab's tok/s of that same
run and the ratio; eager and under torch.compile, fp32 and bf16 autocast.

    # the performance issue's shape (6 x 384, 6 heads, ctx 256, batch 8, vocab 8192), GPT-2 and Llama, fp32 and
    # bf16, eager and compiled:
    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --presets gpt2_small --set n_kv_head=null --steps 3 --warmup 1
    python benchmarks/train_throughput.py --profile 12 --modes eager --precision bf16   # + top ops of each step
    python benchmarks/train_throughput.py --plain-xlab --no-keep-freed-memory ...       # XLab before the speed-ups
    python benchmarks/train_throughput.py --loop --precision fp32 bf16                  # Trainer step vs old loop

`--loop` times the whole training step of `training.trainer.Trainer` (sampler, transfer, forward/backward, clipping,
NaN guard, update, schedule, metric sums) against the loop body of commit 435677f (before the Trainer), taking turns
step by step on one Trainer: same model, optimizer and data, so the ratio is the cost of the loop's own code.

Like XLab's trainer, the script sets glibc to keep freed memory (xlab/device.py) unless told not to; that speeds
up the peer as much, so it moves tok/s, not the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from xlab.device import cpu_isa, keep_freed_memory
from xlab.errors import XLabError
from xlab.models import XLabModel
from xlab.training.mfu import mfu, peak_flops

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
ISSUE_SHAPE = ["n_layer=6", "d_model=384", "n_head=6", "n_kv_head=null"]


def preset(name: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for parent in cfg.pop("defaults", []):  # a preset may extend another (gpt2_small: the gpt block at a size)
        if parent != "_self_":
            cfg = {**preset(parent, []), **cfg}
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


def make_step(model: torch.nn.Module, kind: str, x: torch.Tensor, dtype: torch.dtype | None):
    """One training step of `model` (kind: xlab | plain | reference | hf) on the batch x, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            if kind == "xlab":
                loss = model(inputs, targets=targets).objective
            elif kind in ("plain", "reference"):  # materialised logits, fp32 cross-entropy (summed, as XLab's)
                logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
                if kind == "plain":  # XLab before the fused head also counted the correct predictions
                    (logits.argmax(-1) == targets).sum()
            else:
                loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not its launch

    return step


def measure(steps: list, n: int, warmup: int) -> list[tuple[float, float]]:
    """(median step seconds, seconds of the first step — compilation included when compiled) of each step
    closure. The closures take turns step by step, so drifts of a shared machine hit them alike."""
    firsts = []
    for step in steps:
        start = time.perf_counter()
        step()
        firsts.append(time.perf_counter() - start)
        for _ in range(warmup - 1):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(n):
        for step, own in zip(steps, times):
            start = time.perf_counter()
            step()
            own.append(time.perf_counter() - start)
    return [(statistics.median(own), first) for own, first in zip(times, firsts)]


def profile(step, rows: int, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = torch.cuda.is_available()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for _ in range(3):
            step()
    print(f"\n#### top ops, {label} (3 steps)\n```")
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48))
    print("```\n", flush=True)


def legacy_loop_step(tr, sums: dict) -> None:
    """The loop body of xlab/training/trainer.py at 435677f: NaN noted on the device, the update always applied."""
    t = tr.t
    step_loss = torch.zeros((), device=tr.device)
    for _ in range(t.grad_accum_steps):
        x, y = tr.sampler.next_batch()
        x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
        with tr.accelerator.accumulate(tr.model):
            objective, loss_sum, correct = tr.model(x, targets=y)
            tr.accelerator.backward(objective * (t.grad_accum_steps / tr.tokens_per_step))
        sums["loss"] += loss_sum.detach()
        sums["correct"] += correct
        step_loss += objective.detach()
    bad = ~torch.isfinite(step_loss)
    sums["first_bad"] = torch.where(bad & (sums["first_bad"] < 0), torch.full_like(sums["first_bad"], 1),
                                    sums["first_bad"])
    if t.grad_clip > 0:
        tr.accelerator.clip_grad_norm_(tr.model.parameters(), t.grad_clip)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)


def loop_table(args) -> None:
    """Trainer.train_step vs the old loop body on one Trainer (issue shape by default), per precision."""
    import tempfile

    from omegaconf import OmegaConf

    from xlab.training.config import TrainConfig
    from xlab.training.trainer import Trainer

    where = f"{platform.processor() or platform.machine()}, ISA {cpu_isa()}"
    print(f"# {where}, {torch.get_num_threads()} threads, torch {torch.__version__}; model {' '.join(args.set)}, "
          f"batch {args.batch} x seq {args.seq}, vocab {args.vocab} (pydocs), median of {args.steps} steps after "
          f"{args.warmup}, taking turns")
    print("| precision | Trainer.train_step tok/s | 435677f loop tok/s | new/old |")
    print("|---|---|---|---|")
    for precision in args.precision:
        cfg = OmegaConf.structured(TrainConfig)
        cfg.model.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
        cfg.model.max_len = args.seq
        cfg.tokenizer.vocab_size = args.vocab
        cfg.logger.trackers = []
        cfg.trainer.update(batch_size=args.batch, precision=precision, max_steps=10**6)
        with tempfile.TemporaryDirectory() as run_dir:
            tr = Trainer(cfg, run_dir)
            sums = {k: torch.zeros((), dtype=torch.float64, device=tr.device) for k in ("loss", "correct")}
            sums["first_bad"] = torch.full((), -1, dtype=torch.long, device=tr.device)
            timed = measure([tr.train_step, functools.partial(legacy_loop_step, tr, sums)], args.steps, args.warmup)
            tr.accelerator.end_training()
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)  # the next precision needs a fresh Accelerator
        GradientState._reset_state()
        tokens = args.batch * args.seq
        (new, _), (old, _) = timed
        print(f"| {precision} | {tokens / new:,.0f} | {tokens / old:,.0f} | **{old / new:.3f}** |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt2_tiny", "llama_tiny"], help="configs/model/<name>.yaml")
    ap.add_argument("--set", nargs="*", default=ISSUE_SHAPE, help="model overrides applied to every preset")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--no-peer", action="store_true", help="time XLab only")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N top ops of each eager step")
    ap.add_argument("--plain-xlab", action="store_true",
                    help="XLab as before the speed-ups: logits + F.cross_entropy, SDPA attention")
    ap.add_argument("--no-keep-freed-memory", action="store_true", help="leave glibc's malloc at its defaults")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--loop", action="store_true", help="Trainer.train_step vs the 435677f loop body (see above)")
    args = ap.parse_args()
    if args.loop:
        return loop_table(args)

    kept = False if args.no_keep_freed_memory else keep_freed_memory()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, ISA {cpu_isa()}"
    print(f"# {where}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; batch {args.batch} x seq {args.seq}, vocab {args.vocab}, median of {args.steps} "
          f"steps after {args.warmup}; keep_freed_memory={kept}; XLab path: "
          f"{'plain (logits, SDPA)' if args.plain_xlab else 'fused head loss, attn_impl=auto'}")
    print("| model | params | precision | mode | XLab tok/s | peer | peer tok/s | XLab/peer | first step XLab/peer "
          "| MFU XLab/peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    tokens = args.batch * args.seq
    for name in args.presets:
        overrides = [f"max_len={args.seq}", *args.set] + (["attn_impl=sdpa"] if args.plain_xlab else [])
        model = XLabModel(args.vocab, **preset(name, overrides)).to(args.device).train()
        peers = [] if args.no_peer else make_peers(model, name, x)
        for precision in args.precision:
            dtype = torch.bfloat16 if precision == "bf16" else None
            for mode in args.modes:
                wrap = torch.compile if mode == "compiled" else (lambda m: m)
                ours_step = make_step(wrap(model), "plain" if args.plain_xlab else "xlab", x, dtype)
                peer_steps = [make_step(wrap(peer), kind, x, dtype) for _, peer, kind in peers]
                timed = measure([ours_step, *peer_steps], args.steps, args.warmup)
                ours, ours_first = timed[0]
                row = f"| {name} | {model.num_params() / 1e6:.1f}M | {precision} | {mode} |"
                util = mfu_of(model, args.device, precision, tokens)  # same shape, same FLOPs for every peer
                for (label, _, _), (theirs, theirs_first) in zip(peers, timed[1:]):
                    print(f"{row} {tokens / ours:,.0f} | {label} | {tokens / theirs:,.0f} | **{theirs / ours:.2f}** |"
                          f" {ours_first:.1f} s / {theirs_first:.1f} s | {util(ours)} / {util(theirs)} |", flush=True)
                if not peers:
                    print(f"{row} {tokens / ours:,.0f} | - | - | - | {ours_first:.1f} s | {util(ours)} |", flush=True)
                if args.profile and mode == "eager":
                    profile(ours_step, args.profile, f"XLab {name} {precision} {mode}")
                    for (label, _, _), step in zip(peers, peer_steps):
                        profile(step, args.profile, f"{label} {precision} {mode}")
                torch._dynamo.reset()


def mfu_of(model: XLabModel, device: str, precision: str, tokens: int):
    """step seconds -> "MFU %" against the device's peak (training/mfu.py's table; "-" where none is known: CPUs)."""
    peak = peak_flops(torch.device(device), "bf16" if precision == "bf16" else "fp32")
    return lambda seconds: f"{100 * mfu(model.flops_per_token(), tokens / seconds, peak):.1f}%" if peak else "-"


def make_peers(model: XLabModel, name: str, x: torch.Tensor) -> list[tuple[str, torch.nn.Module, str]]:
    """(label, module, make_step kind) of each peer of `model` that exists: the plain PyTorch GPT
    (benchmarks/reference_gpt.py; GPT-2 blocks only) and the transformers model, both holding model's weights."""
    from reference_gpt import ReferenceGPT

    from xlab.models.hf import to_hf_model

    peers = []
    try:
        ref = ReferenceGPT.like(model).train()
        with torch.no_grad():  # the same weights must give the same loss, or the race is between different models
            ours, theirs = model(x[:, :-1], targets=x[:, 1:]).ce / x[:, 1:].numel(), ref(x[:, :-1], x[:, 1:])
        print(f"<!-- {name}: loss at init XLab {ours.item():.5f}, ReferenceGPT {theirs.item():.5f} -->")
        peers.append(("ReferenceGPT", ref, "reference"))
    except ValueError as err:
        print(f"<!-- {name}: no plain PyTorch peer: {err} -->")
    try:
        hf = to_hf_model(model).to(model.device).train()
        peers.append((type(hf).__name__, hf, "hf"))
    except XLabError as err:
        print(f"<!-- {name}: no transformers peer: {err} -->")
    return peers

if __name__ == "__main__":
    main()
