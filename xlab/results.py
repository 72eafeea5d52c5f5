"""`python -m xlab.results RUN_OR_SWEEP_DIR [...] [--split test]`: the results table of runs on a held-out split.

For each run (a sweep dir stands for its jobs) and each of its `best` and `last` checkpoints: loss, next-token
accuracy and bits per byte on the split (test by default: the split no choice was tuned on), and the downstream
tasks of its eval_tasks.json where `xlab.evaluate tasks=[...]` wrote one (value ± stderr). A checkpoint is scored
once: its eval_<split>.json is reused when it already holds bits per byte. The table is printed and written to
results.md in the sweep dir (or the first run dir), or to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xlab.errors import XLabError
from xlab.evaluation.windows import score_checkpoint
from xlab.training.runs import run_labels, runs_in

CHECKPOINTS = ("best", "last")


def checkpoint_scores(run: Path, split: str, batch_size: int, device: str) -> list[tuple[str, str, dict]]:
    """(checkpoint name, step dir, scores) of the run's best and last checkpoints (one row when they coincide)."""
    rows, seen = [], {}
    for name in CHECKPOINTS:
        link = run / "checkpoints" / name
        if not link.exists():
            continue
        target = link.resolve()
        if target in seen:  # best is last: one evaluation, one row naming both
            rows[seen[target]] = (f"{rows[seen[target]][0]} = {name}", *rows[seen[target]][1:])
            continue
        cached = target / f"eval_{split}.json"
        scores = json.loads(cached.read_text()) if cached.is_file() else {}
        if "bits_per_byte" not in scores:
            scores = score_checkpoint(target, split, batch_size, device=device)
        seen[target] = len(rows)
        rows.append((name, target.name, {**scores, "tasks": task_scores(target)}))
    return rows


def task_scores(step_dir: Path) -> dict[str, str]:
    """"<task> <metric>" → "value ± stderr" from the checkpoint's eval_tasks.json; {} without one."""
    path = step_dir / "eval_tasks.json"
    if not path.is_file():
        return {}
    cells = {}
    try:
        for row in json.loads(path.read_text())["rows"]:
            stderr = f" ± {row['stderr']:.3f}" if row.get("stderr") is not None else ""
            cells[f"{row['task']} {row['metric']}"] = f"{row['value']:.3f}{stderr}"
    except (ValueError, KeyError, TypeError) as exc:
        raise XLabError(f"{path} is damaged ({type(exc).__name__}: {exc}); run xlab.evaluate tasks=[...] again or "
                        "remove it") from None
    return cells


def results_table(inputs: list[Path], split: str = "test", batch_size: int = 8, device: str = "auto") -> str:
    runs: list[Path] = []
    for path in inputs:
        runs += [r for r in runs_in(path) if r not in runs]
    table = []
    for run, label in zip(runs, run_labels(runs)):
        rows = checkpoint_scores(run, split, batch_size, device)
        if not rows:
            raise XLabError(f"{str(run)!r} has no checkpoints/best or checkpoints/last")
        table += [(label, *row) for row in rows]
    tasks = list(dict.fromkeys(k for *_, s in table for k in s["tasks"]))
    lines = [f"| Version | Checkpoint | Loss ({split}) | Accuracy ({split}) | Bits per byte ({split}) |"
             + "".join(f" {t} |" for t in tasks), "|---|---|---|---|---|" + "---|" * len(tasks)]
    for label, name, step_dir, s in table:
        lines.append(f"| {label} | {name} ({step_dir}) | {s['loss']:.4f} | {s['accuracy']:.2f}% | "
                     f"{s['bits_per_byte']:.4f} |" + "".join(f" {s['tasks'].get(t, '')} |" for t in tasks))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xlab.results", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("--split", default="test", choices=["val", "test", "predict"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="default: results.md in the first input dir")
    args = parser.parse_args(argv)
    try:
        table = results_table(args.runs, args.split, args.batch_size, args.device)
        out = args.out or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "results.md"
        out.write_text(table)
    except (XLabError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(table, end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
