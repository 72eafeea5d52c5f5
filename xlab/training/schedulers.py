"""Learning-rate schedules (`scheduler.name` in configs/scheduler/*.yaml), as multipliers of the peak lr given to
torch's LambdaLR. Every schedule warms up linearly over warmup_steps, and the decaying ones end at min_lr_ratio."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from xlab.registry import Registry
from xlab.training.config import SchedulerConfig

Multiplier = Callable[[int], float]
SCHEDULERS: Registry[Callable[[SchedulerConfig, int], Multiplier]] = Registry("scheduler")


def _with_warmup(cfg: SchedulerConfig, after: Multiplier) -> Multiplier:
    """Linear ramp over the first warmup_steps (step 0 already trains at lr/warmup), then `after`."""
    return lambda step: (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else after(step)


def _progress(step: int, start: int, end: int) -> float:
    return min(1.0, max(0.0, (step - start) / max(1, end - start)))


@SCHEDULERS.register("cosine")
def cosine(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    floor = cfg.min_lr_ratio
    return _with_warmup(cfg, lambda step: floor + (1 - floor) * 0.5 * (
        1 + math.cos(math.pi * _progress(step, cfg.warmup_steps, max_steps))))


@SCHEDULERS.register("linear")
def linear(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    floor = cfg.min_lr_ratio
    return _with_warmup(cfg, lambda step: 1 - (1 - floor) * _progress(step, cfg.warmup_steps, max_steps))


@SCHEDULERS.register("constant")
def constant(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    return _with_warmup(cfg, lambda step: 1.0)


@SCHEDULERS.register("wsd")
def warmup_stable_decay(cfg: SchedulerConfig, max_steps: int) -> Multiplier:
    """Warmup, a long stable phase at the peak, then a linear decay over the last decay_fraction of training
    (MiniCPM): checkpoints from the stable phase can be decayed later to branch off runs."""
    floor = cfg.min_lr_ratio
    decay_start = max(cfg.warmup_steps, round(max_steps * (1 - cfg.decay_fraction)))
    return _with_warmup(cfg, lambda step: 1 - (1 - floor) * _progress(step, decay_start, max_steps))


def check_scheduler_config(cfg: SchedulerConfig) -> None:
    """The name (its numbers are checked by the schema, xlab/schema.py)."""
    SCHEDULERS.get(cfg.name)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULERS.get(cfg.name)(cfg, max_steps))
