"""Who may write into a run dir, decided before anything is written there.

A run dir holds one run. Two processes writing one at once (an overlapping SLURM requeue, a command started twice)
delete each other's temporary checkpoints; a fresh run started over an old one overwrites its step_* checkpoints,
moves `last` and mixes two runs in metrics.jsonl. So:
- `lock_run_dir`: rank 0 of a `python -m xlab.train` run holds a lock on <run>/.lock (xlab/fsio.py, as the data
  cache does) until it exits, and a second writer is refused. The OS drops the lock of a killed run: never stale.
- `check_run_dir`: a run without `resume` refuses a run dir with checkpoints unless `overwrite=true`, and then
  `clear_run_dir` removes the old run's outputs before the new run writes any.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import IO

from xlab.errors import XLabError
from xlab.fsio import try_lock

LOCK = ".lock"
OLD_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard")  # what overwrite=true removes (Hydra rewrites .hydra/)
_held: dict[Path, IO] = {}  # run dir → its open lock file: the lock lasts as long as the process


def is_rank_zero() -> bool:
    """Rank 0 of a launch (torchrun, accelerate launch and XLab's submitit callback set RANK; in a SLURM task of
    submitit, before that callback has run, SLURM_PROCID says it), or a lone process."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return os.environ.get("SLURM_PROCID", "0") == "0"
    return os.environ.get("RANK", "0") == "0"


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold <run_dir>/.lock until this process exits (again: a no-op), or fail in one line naming the holder."""
    key = Path(run_dir).absolute()
    if key in _held:
        return
    f = try_lock(key / LOCK)
    if f is None:
        holder = (key / LOCK).read_text().strip() or "a process that is starting"
        raise XLabError(f"hydra.run.dir={run_dir} is in use by another run ({holder}); wait for it to end, or give "
                        "another hydra.run.dir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # for the refusal's message only
    f.flush()
    _held[key] = f


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether <run_dir>/checkpoints holds a checkpoint or a `last` link (temporary dirs of a cut save do not count)."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(p.name == "last" or p.name.startswith(("step_", "nan_step_"))
                                 for p in root.iterdir())


def check_run_dir(run_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a fresh run into a run dir that holds another run's checkpoints (unless overwrite)."""
    if resume is None and not overwrite and has_checkpoints(run_dir):
        raise XLabError(f"hydra.run.dir={run_dir} holds the checkpoints of another run; continue it with resume=auto, "
                        "give a new hydra.run.dir, or replace it with overwrite=true")


def clear_run_dir(run_dir: str | Path) -> list[str]:
    """overwrite=true: remove the old run's checkpoints, metrics.jsonl and TensorBoard events; the names removed."""
    removed = []
    for name in OLD_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
