"""Learning-rate schedules (`scheduler.name` in configs/scheduler/*.yaml) as torch LambdaLR multipliers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from xlab.config import SchedulerConfig
from xlab.errors import XLabError
from xlab.registry import Registry

Multiplier = Callable[[int], float]
SCHEDULERS: Registry[Callable[[SchedulerConfig, int], Multiplier]] = Registry("scheduler")


def _warmup(step: int, warmup: int) -> float | None:
    """Linear ramp over the first `warmup` steps (step 0 already trains at lr/warmup), then None."""
    return (step + 1) / warmup if step < warmup else None


@SCHEDULERS.register("cosine")
def cosine(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    def f(step: int) -> float:
        w = _warmup(step, cfg.warmup_steps)
        if w is not None:
            return w
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@SCHEDULERS.register("constant")
def constant(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    return lambda step: _warmup(step, cfg.warmup_steps) or 1.0


def check_scheduler_config(cfg: SchedulerConfig) -> None:
    SCHEDULERS.get(cfg.name)
    if cfg.warmup_steps < 0:
        raise XLabError(f"scheduler.warmup_steps={cfg.warmup_steps} must be >= 0")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise XLabError(f"scheduler.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULERS.get(cfg.name)(cfg, max_steps))
