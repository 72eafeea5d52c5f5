"""Optimizers (`optimizer.name` in configs/optimizer/*.yaml), built over decay / no-decay parameter groups."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xlab.config import OptimizerConfig
from xlab.errors import XLabError
from xlab.registry import Registry

OPTIMIZERS: Registry[Callable[[nn.Module, OptimizerConfig], torch.optim.Optimizer]] = Registry("optimizer")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings (a tied output head is an embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer_config(cfg: OptimizerConfig) -> None:
    OPTIMIZERS.get(cfg.name)
    if cfg.lr <= 0:
        raise XLabError(f"optimizer.lr={cfg.lr} must be > 0")
    if cfg.weight_decay < 0:
        raise XLabError(f"optimizer.weight_decay={cfg.weight_decay} must be >= 0")


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise XLabError(f"optimizer.betas={list(cfg.betas)} must be two numbers in [0, 1)")
    groups = param_groups(model, cfg.weight_decay)
    # The fused kernel updates every parameter in one pass (CPU and CUDA); fall back to foreach where it is missing.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
