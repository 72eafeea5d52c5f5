"""`trainer.ema_decay`: an exponential moving average of the weights, the model a run evaluates and publishes.

Each optimizer step moves the average towards the trained weights by (1 - decay), with the decay ramped up over the
first steps, (1 + t) / (10 + t) until it reaches ema_decay, so the average does not remember the random
initialisation (timm's and Polyak's averaging do the same). Evaluation, `checkpoints/best` and a checkpoint's
model.safetensors hold the average, so evaluate, generate, export and serve use it with no option of their own; the
trained weights go beside it into train_weights.safetensors, from which a resume continues training bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_model
from torch import nn

from xlab.checkpoint.write import save_state_dict
from xlab.fsio import opened_inside

TRAIN_WEIGHTS = "train_weights.safetensors"  # the trained (not averaged) weights of an ema_decay run's checkpoint


class WeightAverage:
    """The average of a model's parameters (fp32, on the parameters' device), updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.params = list(model.parameters())  # a tied weight once
        self.average = self._copy_of_model()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[list[torch.Tensor]]:
        """The average in the model for the duration (evaluating, saving); yields the trained weights, which are put
        back after."""
        trained = [p.detach().clone() for p in self.params]
        self._copy_into_model(self.average)
        try:
            yield trained
        finally:
            self._copy_into_model(trained)

    def _copy_of_model(self) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def _copy_into_model(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self.params, values, strict=True):
            p.copy_(value)

    def save_trained(self, trained: list[torch.Tensor], directory: Path) -> None:
        """The trained weights (as `applied` yields them) into directory/train_weights.safetensors."""
        by_param = {id(p): value for p, value in zip(self.params, trained, strict=True)}
        state = {name: by_param[id(p)].cpu() for name, p in self.model.named_parameters(remove_duplicate=False)}
        save_state_dict(self.model, state, directory / TRAIN_WEIGHTS)

    @torch.no_grad()
    def resume(self, ckpt: Path) -> None:
        """After the checkpoint's model.safetensors was loaded into the model: that is the average; the trained
        weights come from train_weights.safetensors (a checkpoint of a run without averaging has none: the average
        starts from its weights)."""
        self.average = self._copy_of_model()
        load_trained_weights(self.model, ckpt)


def load_trained_weights(model: nn.Module, ckpt: Path) -> bool:
    """Load a checkpoint's train_weights.safetensors into `model`, if it has one (a run with ema_decay saved it):
    a resume continues from the trained weights, not from the average in model.safetensors."""
    if not (Path(ckpt) / TRAIN_WEIGHTS).is_file():
        return False
    device = next(model.parameters()).device
    with opened_inside(ckpt, TRAIN_WEIGHTS) as opened:  # load_model: a tied weight is stored once, tied again here
        load_model(model, str(opened), device="cpu" if device.type == "cpu" else str(device))
    return True
