"""Where metrics go: `<run>/metrics.jsonl` always (rank 0), plus Accelerate trackers named in `logger.trackers`
(configs/logger/*.yaml). TRACKERS maps a name to the tracker Accelerate should start."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xlab.registry import Registry

TRACKERS: Registry[Callable[[Path], Any]] = Registry("logger")


@TRACKERS.register("tensorboard")
def tensorboard(run_dir: Path) -> Any:
    return "tensorboard"  # Accelerate's TensorBoardTracker, writing under <run>/tensorboard/


class MetricsFile:
    """Appends one JSON object per line; the format every plot and test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


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
