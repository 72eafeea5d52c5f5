"""`python -m xlab.plot RUN_DIR [RUN_DIR ...] [--out FILE]`: learning curves of runs from their metrics.jsonl.

One PNG: rows loss, bits per byte, accuracy, learning rate and tokens/s; columns against optimizer step and against
tokens seen. Train curves are solid, evaluation curves dashed with markers; each run has one colour, named in the
legend. A sweep dir stands for all of its jobs, labelled by the overrides that differ between them. The default
output is `curves.png` in the sweep dir, or in the first run dir.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlab.errors import XLabError
from xlab.training.runs import METRICS, read_metrics, run_labels, runs_in

# (panel title, y label, [(metric key, style)]) per row; "train" lines are solid, "val" lines dashed
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("loss", "loss (nats/token)", [("train/loss", "train"), ("val/loss", "val")]),
    ("bits per byte", "bits per byte (any tokenizer)", [("train/bpb", "train"), ("val/bpb", "val")]),
    ("accuracy", "next-token accuracy (%)", [("train/accuracy", "train"), ("val/accuracy", "val")]),
    ("learning rate", "lr", [("lr", "train")]),
    ("throughput", "tokens/s", [("tok_per_s", "train")]),
]
X_AXES = (("step", "optimizer step"), ("tokens", "tokens seen"))


@dataclass
class Curves:
    label: str
    path: Path  # the run dir
    records: list[dict[str, Any]]






def load_runs(inputs: list[Path]) -> list[Curves]:
    paths: list[Path] = []
    for path in inputs:
        paths += [p for p in runs_in(path) if p not in paths]
    runs = []
    for path, label in zip(paths, run_labels(paths)):
        records = read_metrics(path / METRICS)
        if not records:
            raise XLabError(f"{str(path / METRICS)!r} has no records yet")
        runs.append(Curves(label, path, records))
    return runs


def default_output(inputs: list[Path]) -> Path:
    first = inputs[0] if inputs[0].is_dir() else inputs[0].parent
    return first / "curves.png"


def plot(runs: list[Curves], out: Path, title: str | None = None) -> Path:
    import matplotlib  # matplotlib: only xlab.plot draws

    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit is imported
    import matplotlib.pyplot as plt  # matplotlib: only xlab.plot draws
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(PANELS), len(X_AXES), figsize=(13, 3.2 * len(PANELS) + 1.2), squeeze=False,
                             layout="constrained")  # makes room for the title above and the legend below
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (panel, ylabel, series) in enumerate(PANELS):
        for col, (x_key, x_label) in enumerate(X_AXES):
            ax = axes[row][col]
            drawn = False
            for i, run in enumerate(runs):
                color = colors[i % len(colors)]
                for key, kind in series:
                    points = sorted((r[x_key], r[key]) for r in run.records if key in r and x_key in r)
                    if not points:
                        continue
                    xs, ys = zip(*points)
                    style = {"linestyle": "--", "marker": "o", "markersize": 3} if kind == "val" else \
                        {"marker": ".", "markersize": 4} if len(points) <= 25 else {}  # short runs stay visible
                    ax.plot(xs, ys, color=color, linewidth=1.4, **style)
                    drawn = True
            ax.set_title(f"{panel} vs {x_key}", fontsize=10)
            ax.set_xlabel(x_label)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if panel == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            if not drawn:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=2, label=run.label)
               for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="black", label="train"),
                Line2D([], [], color="black", linestyle="--", marker="o", markersize=3, label="val")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False)
    fig.suptitle(title or "XLab learning curves")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xlab.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run dirs (holding metrics.jsonl) or sweep dirs (holding job dirs)")
    parser.add_argument("--out", type=Path, help="PNG file (default: curves.png in the first RUN_DIR)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        out = args.out or default_output(args.runs)
        if out.suffix.lower() != ".png":
            raise XLabError(f"--out {str(out)!r} must be a .png file")
        plot(runs, out, args.title)
    except XLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) != 1 else ''})")


if __name__ == "__main__":
    main()
