"""Recipe benchmark: candidate training recipes at equal wall-clock on three corpora, scored on held-out text in bits
per byte (the test split, on each run's best and last checkpoints).

    python benchmarks/corpora.py --out ~/.cache/xlab/corpora        # the two natural-English corpora, offline
    python benchmarks/recipes.py --budget-s 300 --corpora pydocs small large --recipes gpt2_900 default
    python benchmarks/recipes.py --seeds 1337 2024 --recipes default   # run-to-run noise of one recipe

Equal wall-clock: each recipe first trains a short probe (PROBE_S seconds, `trainer.max_time_s`, configured for
PROBE_STEPS steps so that step-count-dependent choices such as trainer.small_data_regularization are those of a
budget-sized run) to measure its step time on this machine, then trains for as many steps as the budget allows at
that speed (evaluation included, data preparation
not: the token cache is warm after a corpus's first run). `gpt2_900` is the fixed baseline — the GPT-2 default of
commit 435677f, 900 steps, whatever its wall time — so the table also says what the budget bought. Every run is a
real `python -m xlab.train` subprocess; scores come from `xlab.results`' scoring of checkpoints/best and
checkpoints/last. One JSON line per run is appended to <out>/runs.jsonl (a rerun skips the runs it finds there);
the table is printed and written to <out>/table.md.
"""

from __future__ import annotations

import argparse
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
GPT2_435677F = ["model=gpt", "optimizer.lr=3e-3", "trainer.small_data_regularization=false"]
RECIPES = {  # name -> train overrides; None steps = as many as the budget allows
    "gpt2_900": (GPT2_435677F, 900),
    "gpt2": (GPT2_435677F, None),
    "default": ([], None),  # whatever `python -m xlab.train` does today
    "default_noreg": (["trainer.small_data_regularization=false"], None),
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
PROBE_STEPS = 900  # the baseline's step count: what the probe's run is configured for
PROBE_S = 25.0
EVALS = 8  # evaluations per run: enough for the best checkpoint to be near the val minimum


def train(run_dir: Path, overrides: list[str], extra: list[str]) -> float:
    """One `python -m xlab.train` run; its wall seconds. Afresh (overwrite=true): a rerun repeats the runs that left
    no result, over what they left."""
    cmd = [sys.executable, "-m", "xlab.train", *overrides, *extra, "logger=none", "overwrite=true",
           f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def step_seconds(run_dir: Path) -> float:
    """Seconds per optimizer step of a probe run, from its train lines after the first (which holds warm-up)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]
    cfg_tokens = rows[-1]["tokens"] / rows[-1]["step"]  # tokens per step
    return cfg_tokens / statistics.median(rates)


def run_recipe(out: Path, corpus: str, recipe: str, seed: int, budget_s: float) -> dict:
    from xlab.results import checkpoint_scores

    overrides, fixed_steps = RECIPES[recipe]
    overrides = [*CORPORA[corpus], *overrides, f"seed={seed}"]
    name = f"{corpus}-{recipe}-{seed}"
    steps = fixed_steps
    if steps is None:
        probe = out / "probes" / name
        train(probe, overrides, [f"trainer.max_steps={PROBE_STEPS}", f"trainer.max_time_s={PROBE_S}",
                                 "trainer.log_every=10", "trainer.save_best=false", f"trainer.eval_every={PROBE_STEPS}",
                                 "trainer.eval_batches=1"])
        # training gets the budget less the evaluations' share (EVALS x eval_batches forward passes, ~1/3 of a step)
        steps = int(budget_s * 0.93 / step_seconds(probe))
    run = out / "runs" / name
    wall = train(run, overrides, [f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // EVALS)}",
                                  f"trainer.ckpt_every={steps}"])
    rows = {n.split(" ")[0]: s for n, _, s in checkpoint_scores(run, "test", 8, "auto")}
    best = json.loads((run / "checkpoints" / "best" / "state.json").read_text())["best"]
    last = rows.get("last", rows["best"])
    return {"corpus": corpus, "recipe": recipe, "seed": seed, "steps": steps, "wall_s": round(wall, 1),
            "best_step": best["step"], "test_bpb_best": rows["best"]["bits_per_byte"],
            "test_acc_best": rows["best"]["accuracy"], "test_bpb_last": last["bits_per_byte"],
            "test_acc_last": last["accuracy"], "overrides": overrides}


def table(results: list[dict]) -> str:
    lines = ["| corpus | recipe | seed | wall (s) | steps | best step | test bpb (best) | test bpb (last) | "
             "test acc (best) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (list(CORPORA).index(r["corpus"]), r["test_bpb_best"])):
        lines.append(f"| {r['corpus']} | {r['recipe']} | {r['seed']} | {r['wall_s']:.0f} | {r['steps']} | "
                     f"{r['best_step']} | {r['test_bpb_best']:.4f} | {r['test_bpb_last']:.4f} | "
                     f"{r['test_acc_best']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--recipes", nargs="+", default=["gpt2_900", "default"], choices=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337])
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall-clock seconds of training per run")
    ap.add_argument("--out", type=Path, default=Path("outputs/recipes"))
    args = ap.parse_args()
    log = args.out / "runs.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    for corpus in args.corpora:
        for recipe in args.recipes:
            for seed in args.seeds:
                if any((r["corpus"], r["recipe"], r["seed"]) == (corpus, recipe, seed) for r in done):
                    continue
                result = run_recipe(args.out, corpus, recipe, seed, args.budget_s)
                done.append(result)
                with open(log, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    text = table([r for r in done if r["corpus"] in args.corpora])
    (args.out / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
