"""Optimizers (`optimizer.name` in configs/optimizer/*.yaml), built over decay / no-decay parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xlab.errors import XLabError
from xlab.registry import Registry
from xlab.training.config import OptimizerConfig

OPTIMIZERS: Registry[Callable[[nn.Module, OptimizerConfig], torch.optim.Optimizer]] = Registry("optimizer")


def _embedding_ids(model: nn.Module) -> set[int]:
    """Parameters that are lookup tables: token/position embeddings and a head tied to them."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float, params: list[nn.Parameter] | None = None,
                 cfg: OptimizerConfig | None = None, lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings (a tied output head is an embedding).
    With cfg and lr, the embeddings (token, and learned positions where the model has them) and the untied output
    head get groups of their own at lr x optimizer.embed_lr_scale and lr x optimizer.head_lr_scale, where those
    are not 1."""
    embeddings = _embedding_ids(model)
    head = getattr(model, "lm_head", None)
    own = {}  # id -> (group key, lr scale) for the parameters with an lr of their own
    if cfg is not None and cfg.embed_lr_scale != 1:
        own.update({i: ("embed", cfg.embed_lr_scale) for i in embeddings})
    if cfg is not None and cfg.head_lr_scale != 1 and head is not None and id(head.weight) not in embeddings:
        own[id(head.weight)] = ("head", cfg.head_lr_scale)
    decay, no_decay, special, seen = [], [], {}, set()
    for p in model.parameters() if params is None else params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in own:
            special.setdefault(own[id(p)], []).append(p)
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for (key, scale), ps in special.items():
        groups.append({"params": ps, "weight_decay": 0.0 if key == "embed" else weight_decay, "lr": lr * scale})
    return groups


def set_weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Change optimizer.weight_decay of a built optimizer: on the groups of decayed parameters (param_groups' rule:
    matrices that are not embeddings, Muon's hidden matrices too), as building it with that value would."""
    embeddings = _embedding_ids(model)
    for group in optimizer.param_groups:
        first = group["params"][0] if group["params"] else None
        if first is not None and first.dim() >= 2 and id(first) not in embeddings:
            group["weight_decay"] = weight_decay


def check_optimizer_config(cfg: OptimizerConfig) -> None:
    """Beyond the schema's checks (number ranges: xlab/schema.py)."""
    OPTIMIZERS.get(cfg.name)
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise XLabError(f"optimizer.betas={list(cfg.betas)} must be two numbers in [0, 1)")


def _adamw(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates every parameter in one pass (CPU and CUDA); fall back to foreach where it is missing.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return _adamw(param_groups(model, cfg.weight_decay, cfg=cfg, lr=cfg.lr), cfg, cfg.lr)


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, so a single LR scheduler, grad clipping and Accelerate see one object.
    Its param_groups are the children's own group dicts: a scheduler's lr changes reach the children."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for opt, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(state)
        # torch's load_state_dict gives each child new group dicts: point at those, or the schedule sets dead ones
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


@OPTIMIZERS.register("muon")
def muon(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Muon (orthogonalised momentum) on the 2-D weights inside the blocks; AdamW on embeddings, the output head,
    norms and biases, which Muon is not designed for (Jordan et al. 2024)."""
    head = getattr(model, "lm_head", None)
    excluded = _embedding_ids(model) | ({id(head.weight)} if head is not None else set())
    hidden = [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in excluded]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    muon_opt = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, adjust_lr_fn=cfg.muon_lr_scale.value)
    adam_lr = cfg.adam_lr or cfg.lr
    adam_opt = _adamw(param_groups(model, cfg.weight_decay, rest, cfg, adam_lr), cfg, adam_lr)
    return CombinedOptimizer([muon_opt, adam_opt])
