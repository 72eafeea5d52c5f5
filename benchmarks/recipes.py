"""Recipe benchmark: candidate training recipes at equal wall-clock on three corpora, scored on held-out text in bits
per byte (the test split, on each run's best and last checkpoints).

    python benchmarks/corpora.py --out ~/.cache/xlab/corpora        # the two natural-English corpora, offline
    python benchmarks/recipes.py --corpora pydocs small large --recipes gpt2_900 default --jobs 2
    python benchmarks/recipes.py --seeds 1337 2024 --recipes default   # run-to-run noise of one recipe

Equal wall-clock, defined by the baseline: `gpt2_900` is the GPT-2 default of commit 435677f, 900 steps; every
other recipe trains for as long as those 900 steps take, at its own speed. A recipe's speed is measured against
the baseline's in one process — Trainer.train_step of each (built from their real configs for this corpus, so
step-count rules such as trainer.small_data_regularization decide as in a run of that length) taking turns step by
step (PROBE_STEPS turns after PROBE_WARMUP) — and its steps are 900 x (baseline step time / its step time). A ratio
measured taking turns does not depend on the VM's speed or load, which varies 2x between these VMs; wall-clock
probes did (seeds of one recipe got 921 and 808 steps). So the step counts, and the scores, reproduce on any
machine of this kind, and the trainings may share the machine (`--jobs 2`: one core each) without changing what
they compute. Evaluation and start-up are not in the ratio (the same for every recipe: EVALS evaluations of
eval_batches). Every run is a real `python -m xlab.train` subprocess; scores come from `xlab.results`' scoring of
checkpoints/best and checkpoints/last. One JSON line per run is appended to <out>/runs.jsonl (a rerun skips the
runs it finds there); the table is printed and written to <out>/table.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CORPORA_DIR = Path(os.environ.get("XLAB_CORPORA", Path.home() / ".cache" / "xlab" / "corpora"))
CORPORA = {  # name -> data overrides
    "pydocs": ["data=pydocs"],
    "small": ["data=text_files", f"data.data_files={CORPORA_DIR / 'small.jsonl'}"],
    "large": ["data=text_files", f"data.data_files={CORPORA_DIR / 'large.jsonl'}"],
    "manual": ["data=text_files", f"data.data_files={CORPORA_DIR / 'manual.jsonl'}"],
}
# the default of commit 435677f: GPT-2 block 4x256, ctx 256, AdamW 3e-3, cosine, no regularisation
GPT2_435677F = ["model=gpt", "model.d_model=256", "optimizer.lr=3e-3", "optimizer.weight_decay=0.1", "scheduler=cosine",
                "scheduler.min_lr_ratio=0.1", "trainer.small_data_regularization=false",
                "optimizer.embed_lr_scale=1"]
RECIPES = {  # name -> train overrides; None steps = as many as the budget allows
    "nanogpt": (None, None),  # not XLab: nanoGPT's README CPU recipe (NANOGPT, nanogpt_run); --budget only
    # narrower models for short budgets: the default (4x256, 5.3M parameters) sees ~2M tokens in 300 s here
    "d128": (["model.d_model=128"], None),
    "d192": (["model.d_model=192", "model.n_head=3"], None),
    "d128_lr6e3": (["model.d_model=128", "optimizer.lr=6e-3"], None),
    "d128_b8": (["model.d_model=128", "trainer.batch_size=8"], None),
    "d128_muon": (["model.d_model=128", "optimizer=muon", "optimizer.adam_lr=6e-3", "optimizer.weight_decay=0.1"],
                  None),
    "d128_l6": (["model.d_model=128", "model.n_layer=6"], None),
    "d128_l3": (["model.d_model=128", "model.n_layer=3"], None),
    "d128_reg": (["model.d_model=128", "model.dropout=0.1", "optimizer.weight_decay=2.0"], None),
    "d128_noreg": (["model.d_model=128", "trainer.small_data_regularization=false"], None),
    "d128_b32": (["model.d_model=128", "trainer.batch_size=32"], None),
    "d128_tied": (["model.d_model=128", "model.tie_embeddings=true"], None),
    "d128_wd2": (["model.d_model=128", "optimizer.weight_decay=2.0"], None),
    "d128_wd2only": (["model.d_model=128", "trainer.small_data_regularization=false", "optimizer.weight_decay=2.0"],
                     None),
    "d128_rdrop": (["model.d_model=128", "model.attn_dropout=0.0"], None),  # the rule's dropout, residual stream only
    "d128_ema": (["model.d_model=128", "trainer.ema_decay=0.99"], None),
    "d128_c128": (["model.d_model=128", "model.max_len=128", "trainer.batch_size=32"], None),
    "gpt2_900": (GPT2_435677F, 900),
    "gpt2": (GPT2_435677F, None),
    "default": ([], None),  # whatever `python -m xlab.train` does today
    "compile": (["trainer.compile=on"], None),
    "relu2": (["model.mlp=relu2"], None),  # modded-nanogpt's MLP: two matrices instead of SwiGLU's three
    "qknorm_cap": (["model.qk_norm=true", "model.logit_softcap=30"], None),
    "muon_wd1": (["optimizer=muon", "optimizer.adam_lr=3e-3", "optimizer.weight_decay=1.0", "optimizer.lr=0.01"],
                 None),
    "relu2_muon": (["model.mlp=relu2", "optimizer=muon", "optimizer.adam_lr=3e-3", "optimizer.weight_decay=1.0",
                    "optimizer.lr=0.01"], None),
    "v2k": (["tokenizer.vocab_size=2048"], None),  # vocabulary by corpus size: fewer, better-trained embeddings
    "v1k": (["tokenizer.vocab_size=1024"], None),
    "drop2": (["model.dropout=0.2"], None),  # more of the small-data rule's dropout, attention's included
    "drop3": (["model.dropout=0.3"], None),
    "drop2_tied": (["model.dropout=0.2", "model.tie_embeddings=true"], None),  # the head shares the embedding
    "drop2_wd4": (["model.dropout=0.2", "optimizer.weight_decay=4.0"], None),
    # fixed data: a wider model, regularised harder, instead of more epochs (Kim et al. 2025)
    "d192_drop2": (["model.d_model=192", "model.n_head=3", "model.dropout=0.2"], None),
    # Muon with AdamW's lr and weight decay (Moonshot's update scale): the small-data rule's decay means the same
    "muon_rms": (["optimizer=muon", "optimizer.muon_lr_scale=match_rms_adamw", "optimizer.lr=3e-3",
                  "optimizer.weight_decay=1.0"], None),
    "zero_init": (["model.residual_init=zero"], None),  # every block starts as the identity (modded-nanogpt)
    "beta99": (["optimizer.betas=[0.9,0.99]"], None),  # nanoGPT's beta2 for small batches
    # per-group learning rates (nanochat, modded-nanogpt: embeddings far above the matrices, the head below)
    "elr1": (["optimizer.embed_lr_scale=1"], None),  # the embeddings at the matrices' lr (the default before 3)
    "elr3": (["optimizer.embed_lr_scale=3"], None),
    "elr10": (["optimizer.embed_lr_scale=10"], None),
    "elr5": (["optimizer.embed_lr_scale=5"], None),
    "elr2": (["optimizer.embed_lr_scale=2"], None),
    "hlr2": (["optimizer.head_lr_scale=2"], None),
    "drop2_elr3": (["model.dropout=0.2", "optimizer.embed_lr_scale=3"], None),
    "drop2_elr5": (["model.dropout=0.2", "optimizer.embed_lr_scale=5"], None),
    "hlr03": (["optimizer.head_lr_scale=0.3"], None),
    "c128": (["model.max_len=128", "trainer.batch_size=32"], None),  # the same tokens a step, half the attention
    "h2": (["model.n_head=2"], None),  # head dim 64 instead of 32
    "rdrop1": (["model.dropout=0.1", "model.attn_dropout=0.0"], None),  # residual dropout only: 0.93x the speed
    "default_noreg": (["trainer.small_data_regularization=false"], None),
    "reg_resid": (["model.dropout=0.1", "model.attn_dropout=0.0", "optimizer.weight_decay=0.2"], None),
    "reg_resid_lin0": (["model.dropout=0.1", "model.attn_dropout=0.0", "optimizer.weight_decay=0.2",
                        "scheduler=linear", "scheduler.min_lr_ratio=0.0"], None),
    "reg_resid_d2": (["model.dropout=0.2", "model.attn_dropout=0.0", "optimizer.weight_decay=0.2"], None),
    "reg_d2": (["model.dropout=0.2", "optimizer.weight_decay=0.2"], None),
    "reg_wd05": (["model.dropout=0.1", "optimizer.weight_decay=0.5"], None),
    "reg_wd1": (["model.dropout=0.1", "optimizer.weight_decay=1.0"], None),
    "reg_wd2": (["model.dropout=0.1", "optimizer.weight_decay=2.0"], None),
    "wd1": (["optimizer.weight_decay=1.0"], None),
    "wd2": (["optimizer.weight_decay=2.0"], None),
    "wd1_lin0": (["optimizer.weight_decay=1.0", "scheduler=linear", "scheduler.min_lr_ratio=0.0"], None),
    "muon05": (["optimizer=muon", "optimizer.lr=0.05"], None),
    "reg_full": (["model.dropout=0.1", "optimizer.weight_decay=0.2"], None),
    "wd05": (["optimizer.weight_decay=0.5", "trainer.small_data_regularization=false"], None),
    "lin0": (["scheduler=linear", "scheduler.min_lr_ratio=0.0"], None),
    "cos0": (["scheduler.min_lr_ratio=0.0"], None),
    "wsd0": (["scheduler=wsd", "scheduler.min_lr_ratio=0.0", "scheduler.decay_fraction=0.3"], None),
    "lr2e3": (["optimizer.lr=2e-3"], None),
    "lr5e3": (["optimizer.lr=5e-3"], None),
    "b8": (["trainer.batch_size=8"], None),
    "tied": (["model.tie_embeddings=true"], None),
    "llama": (["model=llama_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.n_kv_head=null"],
              None),
    "modern": (["model=modern_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4"], None),
    "llama_muon": (["model=llama_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4",
                    "model.n_kv_head=null", "optimizer=muon"], None),
    "llama_wsd": (["model=llama_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4",
                   "model.n_kv_head=null", "scheduler=wsd"], None),
    "llama_drop": (["model=llama_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4",
                    "model.n_kv_head=null", "model.dropout=0.1", "optimizer.weight_decay=0.2"], None),
    "llama_v2k": (["model=llama_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4",
                   "model.n_kv_head=null", "tokenizer.vocab_size=2048"], None),
}
BASELINE_STEPS = 900  # the baseline's steps: every other recipe trains for the same wall-clock at its own speed
PROBE_STEPS, PROBE_WARMUP = 20, 3
EVALS = 8  # evaluations per run: enough for the best checkpoint to be near the val minimum


def train(run_dir: Path, overrides: list[str], extra: list[str], threads: int | None) -> float:
    """One `python -m xlab.train` run (with `threads` torch threads; None = all cores); its wall seconds. Afresh
    (overwrite=true): a rerun repeats the runs that left no result, over what they left."""
    cmd = [sys.executable, "-m", "xlab.train", *overrides, *extra, "logger=none", "overwrite=true",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def speed_ratio(probe_dir: Path, baseline: list[str], recipe: list[str], steps: int = BASELINE_STEPS) -> float:
    """Baseline step time / recipe step time: Trainer.train_step of both, built from their real configs (configured
    for the baseline's steps, so step-count rules such as trainer.small_data_regularization decide as in a run of about
    that length), taking turns step by step in one subprocess, so the VM's speed and load cancel out."""
    cmd = [sys.executable, __file__, "--speed-probe", json.dumps([baseline, recipe]), "--out", str(probe_dir),
           "--baseline-steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def speed_probe(pair: list[list[str]], probe_dir: Path, steps: int = BASELINE_STEPS) -> None:
    """--speed-probe: print the step-time ratio of pair[0] to pair[1] (median of PROBE_STEPS turns after warm-up)."""
    from hydra import compose, initialize_config_dir

    from xlab.cli import CONFIG_DIR, register_schema
    from xlab.training.config import TrainConfig
    from xlab.training.trainer import Trainer

    register_schema("train", TrainConfig)
    trainers = []
    for i, overrides in enumerate(pair):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, f"trainer.max_steps={steps}",
                                                          "logger=none"])
        trainers.append(Trainer(cfg, probe_dir / str(i)))
    times: list[list[float]] = [[], []]
    for n in range(PROBE_WARMUP + PROBE_STEPS):
        for tr, t in zip(trainers, times):
            start = time.perf_counter()
            tr.train_step()
            if n >= PROBE_WARMUP:
                t.append(time.perf_counter() - start)
    print(statistics.median(times[0]) / statistics.median(times[1]))


# nanoGPT's README CPU recipe (train.py's defaults as its shakespeare_char config sets them, with the README's CPU
# overrides): GPT-2 block 4x128, context 64, batch 12, AdamW lr 1e-3, betas 0.9/0.99, weight decay 0.1 on every
# matrix (embeddings included), 100 warm-up steps, cosine to lr/10, grad clip 1.0, dropout 0, fp32, no compile.
NANOGPT = {"n_layer": 4, "n_head": 4, "d_model": 128, "max_len": 64, "batch_size": 12, "lr": 1e-3, "betas": (0.9, 0.99),
           "weight_decay": 0.1, "warmup": 100, "min_lr_ratio": 0.1, "grad_clip": 1.0}


def nanogpt_init(model) -> None:
    """nanoGPT's _init_weights: N(0, 0.02) for linear and embedding weights, zero biases, and the residual
    projections (attn.proj, mlp.proj) at 0.02 / sqrt(2 * n_layer)."""
    import math

    import torch

    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * len(model.blocks)) if name.endswith("proj.weight") else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


class Scored:
    """XLab's forward interface over the reference model, so xlab.evaluation.windows.score_windows scores both alike."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x, targets):
        import torch.nn.functional as F

        logits = self.model(x).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        return ce, ce, (logits.argmax(-1) == targets).sum()

    def eval(self):
        return self.model.eval()

    def train(self, mode: bool = True):
        return self.model.train(mode)

    @property
    def training(self) -> bool:
        return self.model.training


def nanogpt_data(overrides: list[str]):
    """The corpus the overrides name, tokenized by XLab (its default tokenizer): the splits both recipes train on."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from xlab.cli import CONFIG_DIR, register_schema
    from xlab.data.datamodule import XLabDataModule
    from xlab.training.config import TrainConfig

    register_schema("train", TrainConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    data = XLabDataModule(cfg.data, cfg.tokenizer, cfg.paths.cache_dir)
    data.prepare()
    return data


def nanogpt_model(vocab_size: int, seed: int):
    """reference_gpt.py's GPT at NANOGPT's shape, nanoGPT's init, and its AdamW (decay on every matrix)."""
    import torch
    from reference_gpt import ReferenceGPT

    c = NANOGPT
    torch.manual_seed(seed)
    model = ReferenceGPT(vocab_size, c["n_layer"], c["n_head"], c["d_model"], c["max_len"])
    nanogpt_init(model)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": c["weight_decay"]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=c["lr"], betas=c["betas"])


def nanogpt_lr(it: int, max_iters: int | None) -> float:
    """nanoGPT's get_lr: linear warm-up, then cosine to min_lr over the run (a far horizon until it is known)."""
    import math

    c = NANOGPT
    if it < c["warmup"]:
        return c["lr"] * (it + 1) / (c["warmup"] + 1)
    ratio = min(1.0, (it - c["warmup"]) / max(1, (max_iters or 10**9) - c["warmup"]))
    return c["lr"] * (c["min_lr_ratio"] + (1 - c["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * ratio)))


def nanogpt_run(overrides: list[str], budget_s: float, seed: int, evals: int = EVALS) -> dict:
    """--nanogpt-run: benchmarks/reference_gpt.py trained with NANOGPT on XLab's tokenized splits of the corpus the
    overrides name, for budget_s seconds of training steps (max_iters set from the step time measured over the first
    steps and re-planned, by xlab.training.budget, as trainer.time_budget_s sets max_steps, so the cosine ends at the
    budget), then scored like XLab (score_windows): test bits per byte of the last weights and of those with the best
    val loss."""
    import copy

    import torch

    from xlab.evaluation.windows import score_windows
    from xlab.training.budget import TimeBudget

    data, c, cpu = nanogpt_data(overrides), NANOGPT, torch.device("cpu")
    model, opt = nanogpt_model(len(data.tokenizer), seed)
    windows, byte_lengths = data.train_windows(c["max_len"], c["batch_size"], seed), torch.as_tensor(
        data.tokenizer.byte_lengths())

    def score(split: str, batches: int | None = None) -> dict:
        return score_windows(Scored(model), data.eval_windows(split, c["max_len"], 32, batches), cpu,
                             byte_lengths=byte_lengths)

    budget, max_iters, it, trained, best = TimeBudget(budget_s), None, 0, 0.0, (float("inf"), None)
    while max_iters is None or it < max_iters:
        started = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, max_iters)
        loss = model(*windows.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        it, seconds = it + 1, time.perf_counter() - started
        trained += seconds
        max_iters = budget.observe(it, seconds, max_iters) or max_iters  # the probe's plan, then re-plans
        if max_iters is not None and (it % max(1, max_iters // evals) == 0 or it >= max_iters):
            val = score("val", 20)["bits_per_byte"]  # evaluation: outside the budget, as in XLab
            best = (val, copy.deepcopy(model.state_dict())) if val < best[0] else best
    last = score("test")
    model.load_state_dict(best[1])
    kept = score("test")
    return {"steps": it, "step_time": round(budget.step_time, 4), "train_s": round(trained, 1),
            "val_bpb_best": best[0], "test_bpb_best": kept["bits_per_byte"], "test_acc_best": kept["accuracy"],
            "test_bpb_last": last["bits_per_byte"], "test_acc_last": last["accuracy"]}


def plan(out: Path, corpus: str, recipe: str, seed: int, baseline: str = "gpt2_900",
         baseline_steps: int = BASELINE_STEPS) -> tuple[list[str], int, float]:
    """(train overrides, steps, speed vs the baseline) of one run: the baseline's steps x the measured speed ratio."""
    overrides, fixed_steps = RECIPES[recipe]
    overrides = [*CORPORA[corpus], *overrides, f"seed={seed}"]
    if fixed_steps is not None:
        return overrides, fixed_steps, 1.0
    if recipe == baseline:
        return overrides, baseline_steps, 1.0
    ratio = speed_ratio(out / "probes" / f"{corpus}-{recipe}-{seed}", [*CORPORA[corpus], *RECIPES[baseline][0]],
                        overrides, baseline_steps)
    return overrides, round(baseline_steps * ratio), ratio


def run_budget(out: Path, corpus: str, recipe: str, seed: int, budget_s: float) -> dict:
    """--budget: one recipe trained for budget_s seconds of training steps (XLab's trainer.time_budget_s, or the
    nanoGPT recipe's own loop with the same rule), scored on the test split: best (by val loss) and last weights."""
    from xlab.results import checkpoint_scores

    row = {"corpus": corpus, "recipe": recipe, "seed": seed, "budget_s": budget_s}
    if RECIPES[recipe][0] is None:  # nanogpt: its own loop, in a subprocess of its own
        cmd = [sys.executable, __file__, "--nanogpt-run", json.dumps([CORPORA[corpus], budget_s, seed])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nanogpt run failed:\n{proc.stderr[-3000:]}")
        return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}
    overrides = [*CORPORA[corpus], *RECIPES[recipe][0], f"seed={seed}"]
    run = out / "runs" / f"{corpus}-{recipe}-{seed}-{budget_s:g}s"
    wall = train(run, overrides, [f"trainer.time_budget_s={budget_s}"], None)
    scores = {n.split(" ")[0]: s for n, _, s in checkpoint_scores(run, "test", 8, "auto")}
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    last = scores.get("last", scores["best"])
    return {**row, "steps": state["step"], "wall_s": round(wall, 1), "best_step": state["best"]["step"],
            "test_bpb_best": scores["best"]["bits_per_byte"], "test_acc_best": scores["best"]["accuracy"],
            "test_bpb_last": last["bits_per_byte"], "test_acc_last": last["accuracy"], "overrides": overrides}


def run_recipe(out: Path, corpus: str, recipe: str, seed: int, planned: tuple, threads: int | None) -> dict:
    """Train one planned run and score its best and last checkpoints on the test split."""
    from xlab.results import checkpoint_scores

    overrides, steps, ratio = planned
    run = out / "runs" / f"{corpus}-{recipe}-{seed}"
    wall = train(run, overrides, [f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // EVALS)}",
                                  f"trainer.ckpt_every={steps}"], threads)
    rows = {n.split(" ")[0]: s for n, _, s in checkpoint_scores(run, "test", 8, "auto")}
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())["best"]
    last = rows.get("last", rows["best"])
    return {"corpus": corpus, "recipe": recipe, "seed": seed, "steps": steps, "speed": round(ratio, 3),
            "wall_s": round(wall, 1), "threads": threads, "best_step": best["step"],
            "test_bpb_best": rows["best"]["bits_per_byte"], "test_acc_best": rows["best"]["accuracy"],
            "test_bpb_last": last["bits_per_byte"], "test_acc_last": last["accuracy"], "overrides": overrides}


def table(results: list[dict]) -> str:
    lines = ["| corpus | recipe | seed | speed vs baseline | steps | best step | test bpb (best) | test bpb (last) | "
             "test acc (best) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (list(CORPORA).index(r["corpus"]), r["test_bpb_best"])):
        lines.append(f"| {r['corpus']} | {r['recipe']} | {r['seed']} | {r.get('speed', 1.0):.2f} | {r['steps']} | "
                     f"{r.get('best_step', '-')} | {r['test_bpb_best']:.4f} | {r['test_bpb_last']:.4f} | "
                     f"{r['test_acc_best']:.2f}% |")
    return "\n".join(lines) + "\n"


def budget_main(args: argparse.Namespace) -> None:
    """--budget: every (corpus, recipe, seed) for the same seconds of training, one run at a time (a run measures its
    own step time: another run beside it would slow it); rows appended to <out>/budget.jsonl, then the table."""
    log = args.out / "budget.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    for key in [(c, r, s) for c in args.corpora for r in args.recipes for s in args.seeds]:
        if any((d["corpus"], d["recipe"], d["seed"], d["budget_s"]) == (*key, args.budget) for d in done):
            continue
        result = run_budget(args.out, *key, args.budget)
        done.append(result)
        with open(log, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    rows = [r for r in done if r["corpus"] in args.corpora and r["budget_s"] == args.budget]
    text = budget_table(rows)
    (args.out / f"budget_{args.budget:g}s.md").write_text(text)
    print(text, end="")


def budget_table(rows: list[dict]) -> str:
    """Per corpus and recipe: test bits per byte (best checkpoint) as the mean of the seeds ± half their spread, and
    the change against the nanoGPT recipe's mean."""
    lines = ["| corpus | recipe | seeds | steps | test bpb (best), mean ± half-spread | test bpb (last) | vs nanogpt |",
             "|---|---|---|---|---|---|---|"]
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["corpus"] == corpus:
                groups.setdefault(r["recipe"], []).append(r)
        base = groups.get("nanogpt")
        base_mean = statistics.mean(r["test_bpb_best"] for r in base) if base else None
        for recipe, runs in sorted(groups.items(), key=lambda kv: statistics.mean(r["test_bpb_best"] for r in kv[1])):
            best = [r["test_bpb_best"] for r in runs]
            mean, spread = statistics.mean(best), (max(best) - min(best)) / 2
            change = f"{100 * (mean / base_mean - 1):+.1f}%" if base_mean else "-"
            lines.append(f"| {corpus} | {recipe} | {len(runs)} | {round(statistics.mean(r['steps'] for r in runs))} | "
                         f"{mean:.4f} ± {spread:.4f} | {statistics.mean(r['test_bpb_last'] for r in runs):.4f} | "
                         f"{change} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--recipes", nargs="+", default=["gpt2_900", "default"], choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337])
    ap.add_argument("--out", type=Path, default=Path("outputs/recipes"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (the cores are split between them)")
    ap.add_argument("--budget", type=float, help="equal wall-clock: each recipe trains this many seconds of training "
                    "steps (trainer.time_budget_s) instead of the baseline's step-time ratio")
    ap.add_argument("--baseline", default="gpt2_900", choices=list(RECIPES), help="equal compute: the recipe whose "
                    "steps set the others' (each trains as long as the baseline's steps take, at its own speed)")
    ap.add_argument("--baseline-steps", type=int, default=BASELINE_STEPS, help="the baseline's steps")
    ap.add_argument("--speed-probe", help=argparse.SUPPRESS)  # internal: the subprocess of speed_ratio
    ap.add_argument("--nanogpt-run", help=argparse.SUPPRESS)  # internal: the subprocess of run_budget
    args = ap.parse_args()
    if args.speed_probe:
        return speed_probe(json.loads(args.speed_probe), args.out, args.baseline_steps)
    if args.nanogpt_run:
        return print(json.dumps(nanogpt_run(*json.loads(args.nanogpt_run))))
    if args.budget:
        return budget_main(args)
    if "nanogpt" in args.recipes:
        ap.error("--recipes nanogpt runs with --budget only (its steps are not XLab's)")
    log = args.out / "runs.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    todo = [(c, r, s) for c in args.corpora for r in args.recipes for s in args.seeds
            if not any((d["corpus"], d["recipe"], d["seed"]) == (c, r, s) for d in done)]
    # Speed probes first, one at a time; the trainings may then share the machine (--jobs): their step counts are
    # fixed, so sharing changes how long they take, not what they compute.
    plans = {key: plan(args.out, *key, args.baseline, args.baseline_steps) for key in todo}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_recipe, args.out, *key, plans[key], threads) for key in todo]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            done.append(result)
            with open(log, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    text = table([r for r in done if r["corpus"] in args.corpora])
    (args.out / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
