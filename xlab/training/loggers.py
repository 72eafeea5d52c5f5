"""Where metrics go: `<run>/metrics.jsonl` always (rank 0), plus Accelerate trackers named in `logger.trackers`
(configs/logger/*.yaml; the names are Accelerate's, a closed choice of the schema: Tracker in xlab/training/config.py).

W&B (`logger=wandb`, `logger=all`): the trainer passes `tracker_init_kwargs(...)` to `accelerator.init_trackers`
and stores `tracker_run_ids(accelerator)` in each checkpoint, so a resumed run appends to the same W&B run. Without
credentials the run is logged offline under `<run>/wandb/` and can be uploaded later with `wandb sync`.
wandb itself is imported by Accelerate only when the tracker starts, never when xlab is imported.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate.state import PartialState
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from xlab.errors import XLabError
from xlab.fsio import publish_file
from xlab.training.config import WandbMode

log = logging.getLogger(__name__)

class MetricsFile:
    """Appends one JSON object per line; the format every plot and test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> int:
        """Drop the lines past `step` (and any line cut short): a run resumed from step N re-runs the steps after N,
        so the file then reads as an uninterrupted run's. Atomic; returns the number of lines dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (n := _step_of(line)) is not None and n <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            publish_file(tmp, self.path)
        return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"model.n_layer": 4, ...} with scalar values, as TensorBoard's hparams want."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out




# --- W&B ---------------------------------------------------------------------------------------------------------


def wandb_has_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc (what wandb itself would use)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(logger_cfg: Any) -> str:
    """logger.mode, else $WANDB_MODE, else online with credentials and offline without (never a login prompt)."""
    mode = logger_cfg.mode or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, str(mode))  # wandb's legacy spellings
    if mode not in {m.value for m in WandbMode}:  # $WANDB_MODE: logger.mode itself is checked by the schema
        valid = ", ".join(m.value for m in WandbMode)
        raise XLabError(f"W&B mode {mode!r} (logger.mode or WANDB_MODE); valid: {valid}")
    if mode == "online" and not wandb_has_credentials():
        # wandb would ask for an API key on a terminal, or fail deep inside wandb.init without one
        raise XLabError("W&B mode is online but no API key is set: run `wandb login`, set WANDB_API_KEY, "
                        "or use logger.mode=offline")
    return mode


def check_logger_config(logger_cfg: Any) -> None:
    """W&B modes (also from $WANDB_MODE) fail at start-up, before any data is prepared."""
    if "wandb" in logger_cfg.trackers:
        wandb_mode(logger_cfg)


def _last_two(path: Path) -> str:
    """`outputs/2026-01-01/12-00-00` → `2026-01-01/12-00-00`: short, and unique for Hydra's default run dirs."""
    return "/".join(Path(path).resolve().parts[-2:])


def _sweep_dir() -> Path | None:
    """The multirun's sweep dir when this process runs a Hydra sweep job, else None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _is_main_process() -> bool:
    return PartialState().is_main_process


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase letters/digits), chosen here so the offline dir name is known in advance."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def tracker_init_kwargs(logger_cfg: Any, run_dir: Path, resume_ids: dict[str, str] | None = None) -> dict[str, dict]:
    """`init_kwargs` for `accelerator.init_trackers`: per tracker, the arguments of its init (wandb.init for W&B).

    W&B: files under <run_dir>/wandb/; project, entity, tags and name from logger_cfg; group from logger_cfg, else the
    sweep dir for a Hydra multirun job (so a sweep's runs are grouped); the run id from resume_ids (a checkpoint's
    `tracker_run_ids`) so a resumed run continues the same W&B run. Call on every rank; only rank 0 prints.
    """
    kwargs: dict[str, dict] = {}
    if "wandb" not in logger_cfg.trackers:
        return kwargs
    run_dir = Path(run_dir)
    mode = wandb_mode(logger_cfg)
    sweep = _sweep_dir()
    run_id = (resume_ids or {}).get("wandb") or new_run_id()
    wandb_kwargs: dict[str, Any] = {
        "dir": str(run_dir),
        "entity": logger_cfg.entity,
        "group": logger_cfg.group or (_last_two(sweep) if sweep is not None else None),
        "tags": list(logger_cfg.tags) or None,
        "name": logger_cfg.name or _last_two(run_dir),
        "id": run_id,
        "resume": "allow",  # continue run_id if W&B knows it, else create it
        "mode": mode,
    }
    if mode == "offline":
        # wandb's own banner would repeat what we print below, once per run, in every job of a sweep
        wandb_kwargs["settings"] = {"silent": True}
        if _is_main_process():
            why = "logger.mode or WANDB_MODE is offline" if logger_cfg.mode or os.environ.get("WANDB_MODE") else \
                "no W&B credentials: no WANDB_API_KEY, no `wandb login`"
            log.info("W&B logs offline (%s) under %s; upload later with: wandb sync %s", why,
                     run_dir / "wandb", run_dir / "wandb" / f"offline-run-*-{run_id}*")
    kwargs["wandb"] = {k: v for k, v in wandb_kwargs.items() if v is not None}
    return kwargs


def tracker_run_ids(accelerator: Any) -> dict[str, str]:
    """Ids of the started tracker runs ({"wandb": run id}) to store in a checkpoint; empty on ranks other than 0."""
    ids: dict[str, str] = {}
    for tracker in getattr(accelerator, "trackers", []):
        run = getattr(tracker, "run", None) if tracker.name == "wandb" else None  # set by start(), on rank 0 only
        if run is not None:
            ids["wandb"] = run.id
    return ids
