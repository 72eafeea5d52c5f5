"""Scoring a model on fixed windows of a split: what training's periodic evaluation and `xlab.evaluate` share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from xlab.errors import XLabError


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Token-level loss, accuracy (%), perplexity and token count over the given windows. With several processes,
    each passes its share of the windows and `reduce` sums the totals across them."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        with autocast():
            _, batch_loss, batch_correct = model(x, targets=y)
        totals += torch.stack([batch_loss.double(), batch_correct.double(), totals.new_tensor(y.numel())])
    model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        raise XLabError("nothing to evaluate: the split has no complete window")
    mean = loss_sum / count
    return {"loss": mean, "accuracy": 100.0 * correct / count, "perplexity": math.exp(min(mean, 50.0)),
            "tokens": int(count)}
