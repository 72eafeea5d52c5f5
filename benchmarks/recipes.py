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
}
# the default of commit 435677f: GPT-2 block 4x256, ctx 256, AdamW 3e-3, cosine, no regularisation
GPT2_435677F = ["model=gpt", "optimizer.lr=3e-3", "optimizer.weight_decay=0.1", "scheduler=cosine",
                "scheduler.min_lr_ratio=0.1", "trainer.small_data_regularization=false"]
RECIPES = {  # name -> train overrides; None steps = as many as the budget allows
    "gpt2_900": (GPT2_435677F, 900),
    "gpt2": (GPT2_435677F, None),
    "default": ([], None),  # whatever `python -m xlab.train` does today
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


def speed_ratio(probe_dir: Path, baseline: list[str], recipe: list[str]) -> float:
    """Baseline step time / recipe step time: Trainer.train_step of both, built from their real configs (configured
    for BASELINE_STEPS, so step-count rules such as trainer.small_data_regularization decide as in a run of about
    that length), taking turns step by step in one subprocess, so the VM's speed and load cancel out."""
    cmd = [sys.executable, __file__, "--speed-probe", json.dumps([baseline, recipe]), "--out", str(probe_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def speed_probe(pair: list[list[str]], probe_dir: Path) -> None:
    """--speed-probe: print the step-time ratio of pair[0] to pair[1] (median of PROBE_STEPS turns after warm-up)."""
    from hydra import compose, initialize_config_dir

    from xlab.cli import CONFIG_DIR, register_schema
    from xlab.training.config import TrainConfig
    from xlab.training.trainer import Trainer

    register_schema("train", TrainConfig)
    trainers = []
    for i, overrides in enumerate(pair):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, f"trainer.max_steps={BASELINE_STEPS}",
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


def plan(out: Path, corpus: str, recipe: str, seed: int) -> tuple[list[str], int, float]:
    """(train overrides, steps, speed vs the baseline) of one run: BASELINE_STEPS x the measured speed ratio."""
    overrides, fixed_steps = RECIPES[recipe]
    overrides = [*CORPORA[corpus], *overrides, f"seed={seed}"]
    if fixed_steps is not None:
        return overrides, fixed_steps, 1.0
    ratio = speed_ratio(out / "probes" / f"{corpus}-{recipe}-{seed}", [*CORPORA[corpus], *GPT2_435677F], overrides)
    return overrides, round(BASELINE_STEPS * ratio), ratio


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
                     f"{r['best_step']} | {r['test_bpb_best']:.4f} | {r['test_bpb_last']:.4f} | "
                     f"{r['test_acc_best']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--recipes", nargs="+", default=["gpt2_900", "default"], choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337])
    ap.add_argument("--out", type=Path, default=Path("outputs/recipes"))
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (the cores are split between them)")
    ap.add_argument("--speed-probe", help=argparse.SUPPRESS)  # internal: the subprocess of speed_ratio
    args = ap.parse_args()
    if args.speed_probe:
        return speed_probe(json.loads(args.speed_probe), args.out)
    log = args.out / "runs.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    todo = [(c, r, s) for c in args.corpora for r in args.recipes for s in args.seeds
            if not any((d["corpus"], d["recipe"], d["seed"]) == (c, r, s) for d in done)]
    # Speed probes first, one at a time; the trainings may then share the machine (--jobs): their step counts are
    # fixed, so sharing changes how long they take, not what they compute.
    plans = {key: plan(args.out, *key) for key in todo}
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
