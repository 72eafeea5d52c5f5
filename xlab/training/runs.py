"""Reading finished run dirs: a run's metrics.jsonl, a sweep's jobs (overrides and last evaluation), and which runs a
path stands for. What xlab.sweep, xlab.plot and xlab.results share; nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xlab.errors import XLabError

METRICS = "metrics.jsonl"


OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class JobResult:
    num: int | None  # Hydra's job number (hydra.job.num), None when the job dir has no .hydra/
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # key → value as typed on the command line
    step: int | None = None
    tokens: int | None = None
    val_loss: float | None = None  # the last evaluation of the run (what `xlab.train` returns to the sweeper)
    val_bpb: float | None = None  # bits per byte of that evaluation: compares across tokenizers
    val_accuracy: float | None = None
    tok_per_s: float | None = None  # median over the run's train lines (the first interval includes warm-up)
    tasks: dict[str, float] = field(default_factory=dict)  # trainer.eval_tasks at that evaluation: "<task>/<metric>"


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_job(path: Path) -> JobResult:
    num = None
    overrides: dict[str, str] = {}
    if (path / OVERRIDES).is_file():
        overrides = dict(_split_override(o) for o in OmegaConf.load(path / OVERRIDES))
        hydra_yaml = path / ".hydra" / "hydra.yaml"
        if hydra_yaml.is_file():
            num = OmegaConf.load(hydra_yaml).hydra.job.get("num")
    job = JobResult(num=num, path=path, overrides=overrides)
    if not (path / METRICS).is_file():
        return job
    records = read_metrics(path / METRICS)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/loss" in r]
    if records:
        job.step = max(r["step"] for r in records)
        job.tokens = max(r["tokens"] for r in records)
    if val:
        job.val_loss, job.val_accuracy = val[-1]["val/loss"], val[-1]["val/accuracy"]
        job.val_bpb = val[-1].get("val/bpb")  # runs from before bits per byte have none
        job.tasks = {k.removeprefix("tasks/"): v for k, v in val[-1].items() if k.startswith("tasks/")}
    speeds = [r["tok_per_s"] for r in train if "tok_per_s" in r]
    if speeds:
        job.tok_per_s = statistics.median(speeds)
    return job


def job_stamps(sweep_dir: Path) -> dict[Path, float]:
    """Job dir → modification time of the file that marks it (Hydra's overrides.yaml, else metrics.jsonl)."""
    if not sweep_dir.is_dir():
        return {}
    if (sweep_dir / "multirun.yaml").is_file():  # any hydra.sweep.subdir, at any depth
        found = [p.parent.parent for p in sweep_dir.rglob(str(OVERRIDES))]
        found += [p.parent for p in sweep_dir.rglob(METRICS)]
    else:  # Optuna's sweeper writes no multirun.yaml; also a dir of runs such as outputs/<date>/
        found = [p for p in sweep_dir.iterdir() if (p / OVERRIDES).is_file() or (p / METRICS).is_file()]
    stamps = {}
    for path in found:
        marker = path / OVERRIDES if (path / OVERRIDES).is_file() else path / METRICS
        stamps[path] = marker.stat().st_mtime
    return stamps


def find_jobs(sweep_dir: Path, before: dict[Path, float] | None = None) -> list[JobResult]:
    """The job dirs of a sweep, in job order. `before` (`job_stamps` at the sweep's start) leaves out the jobs of an
    earlier sweep into the same dir: only dirs written since then count. File times are compared with file times,
    never with this machine's clock, which may differ from a cluster file system's."""
    jobs = [read_job(path) for path, stamp in job_stamps(sweep_dir).items()
            if before is None or before.get(path) != stamp]
    return sorted(jobs, key=lambda j: (j.num is None, j.num if j.num is not None else 0, str(j.path)))


def runs_in(path: Path) -> list[Path]:
    """A run dir (or its metrics.jsonl) → [it]; a sweep dir, or any dir of run dirs (outputs/<date>/) → its runs in
    job order (find_jobs)."""
    if path.is_file() and path.name == METRICS:
        return [path.parent]
    if not path.is_dir():
        raise XLabError(f"{str(path)!r} does not exist" if not path.exists() else f"{str(path)!r} is not a run dir")
    if (path / METRICS).is_file():
        return [path]
    runs = [job.path for job in find_jobs(path) if (job.path / METRICS).is_file()]
    if not runs:
        raise XLabError(f"{str(path)!r} has no {METRICS}: not a run dir, nor a sweep dir with a finished job")
    return runs


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's overrides that differ between the runs (a sweep's swept values); without any, its dir relative to
    the runs' common parent (a job number, a <date>/<time>)."""
    jobs = [read_job(p) for p in paths]
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    common = os.path.commonpath([str(p.resolve()) for p in paths])
    labels = []
    for path, job in zip(paths, jobs):
        label = " ".join(f"{k}={job.overrides[k]}" for k in varying if k in job.overrides)
        if not label:
            label = os.path.relpath(path.resolve(), common) if len(paths) > 1 else path.resolve().name
        labels.append(label if len(label) <= 70 else label[:69] + "…")
    return labels


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a killed run is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
