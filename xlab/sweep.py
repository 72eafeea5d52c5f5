"""Sweep summary: after a `python -m xlab.train -m ...` sweep (grid, Optuna, any launcher), one table of every job.

Hydra calls `SweepSummary.on_multirun_end` in the launching process once all jobs have returned (configs/train.yaml,
`hydra.callbacks`). It reads each job dir's `.hydra/overrides.yaml` and `metrics.jsonl`, not the jobs' return values,
so it works the same when the jobs ran elsewhere (submitit/SLURM), and writes `summary.md` and `summary.csv` into the
sweep dir. `python -m xlab.sweep SWEEP_DIR` writes them again for any sweep dir (e.g. after extra jobs).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xlab.training.runs import METRICS, OVERRIDES, JobResult, find_jobs, job_stamps

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("step", "tokens", "val_loss", "val_bpb", "val_accuracy", "tok_per_s")












def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _short(value: str) -> str:
    """Optuna's lr=0.00024156772025296256 → 0.0002416 for reading; the CSV keeps every digit."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and "." in value else value


def write_summary(sweep_dir: Path, jobs: list[JobResult]) -> tuple[Path, Path]:
    """summary.csv (every override key, full precision) and summary.md (the overrides that differ between jobs)."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    tasks = list(dict.fromkeys(k for job in jobs for k in job.tasks))
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    common = [f"{k}={jobs[0].overrides[k]}" for k in keys if k not in varying and k in jobs[0].overrides]

    csv_path = sweep_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, *RESULT_COLUMNS, *tasks, "dir"])
        for job in jobs:
            results = [getattr(job, c) for c in RESULT_COLUMNS] + [job.tasks.get(t) for t in tasks]
            writer.writerow([job.num, *(job.overrides.get(k, "") for k in keys),
                             *("" if v is None else v for v in results), job.path.relative_to(sweep_dir)])

    done = [j for j in jobs if j.val_loss is not None]
    best = min(done, key=lambda j: j.val_loss) if done else None
    lines = [f"# Sweep {sweep_dir}", "", f"{len(jobs)} jobs, {len(done)} with a final evaluation."]
    if common:
        lines += ["", "Common overrides: `" + " ".join(common) + "`"]
    header = ["job", *varying, "val loss", "val bpb", "val acc (%)", *tasks, "tok/s", "step", "dir"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        mark = " **best**" if job is best and len(done) > 1 else ""
        cells = [_fmt(job.num, 0), *(_short(job.overrides.get(k, "")) for k in varying),
                 _fmt(job.val_loss, 4) + mark, _fmt(job.val_bpb, 4), _fmt(job.val_accuracy, 2),
                 *(_fmt(job.tasks.get(t), 3) for t in tasks), _fmt(job.tok_per_s, 0), _fmt(job.step, 0),
                 str(job.path.relative_to(sweep_dir))]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None and len(done) > 1:
        lines += ["", f"Best: job {best.num} (val loss {best.val_loss:.4f}): "
                      f"`{' '.join(f'{k}={v}' for k, v in best.overrides.items() if k in varying) or '-'}`"]
    md_path = sweep_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


class SweepSummary(Callback):
    """Hydra callback (configs/train.yaml): the summary table of a multirun, written when its last job returns."""

    def __init__(self) -> None:
        self.before: dict[Path, float] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = job_stamps(Path(config.hydra.sweep.dir))  # jobs of an earlier sweep into the same dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = find_jobs(sweep_dir, before=self.before)
        if not jobs:
            log.warning("sweep summary: no job dirs under %s", sweep_dir)
            return
        md_path, csv_path = write_summary(sweep_dir, jobs)
        log.info("sweep summary (%d jobs): %s, %s\n%s", len(jobs), md_path, csv_path, md_path.read_text())


class SubmititDistributedEnv(Callback):
    """Hydra callback (configs/train.yaml): a submitit job (hydra/launcher=slurm|local) with several tasks is one
    distributed training run, one rank per task. submitit starts the tasks but sets none of torch.distributed's
    variables; this sets them (MASTER_ADDR = the job's first node, MASTER_PORT drawn from the job id, unless the job's
    environment gives them) before the task runs. Without submitit, or under torchrun / accelerate launch (RANK
    already set), it does nothing."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
            return
        import submitit  # the optional `sweep` extra

        if submitit.JobEnvironment().num_tasks > 1:
            env = submitit.helpers.TorchDistributedEnvironment()  # honours a MASTER_PORT the job was given
            env.master_addr = os.environ.get("MASTER_ADDR", env.master_addr)
            # overwrite: a given MASTER_ADDR/PORT is kept (above), and RANK is unset here; keep every GPU visible:
            # Accelerate picks cuda:LOCAL_RANK itself
            env.export(set_cuda_visible_devices=False, overwrite=True)
            log.info("submitit task %d of %d: torch.distributed via %s:%d", env.rank, env.world_size,
                     env.master_addr, env.master_port)


def main(argv: list[str] | None = None) -> None:
    """`python -m xlab.sweep SWEEP_DIR`: (re)write the summary of every job dir under SWEEP_DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m xlab.sweep SWEEP_DIR")
    sweep_dir = Path(args[0])
    jobs = find_jobs(sweep_dir) if sweep_dir.is_dir() else []
    if not jobs:
        print(f"error: {str(sweep_dir)!r} is not a sweep dir: no job dirs with {METRICS} or {OVERRIDES}",
              file=sys.stderr)
        sys.exit(2)
    md_path, _ = write_summary(sweep_dir, jobs)
    print(md_path.read_text(), end="")


if __name__ == "__main__":
    main()
