"""Training metrics of one log interval: summed on the device step by step, read by the host once per interval.

A dropped update (trainer.on_nan) counts as skipped and adds nothing to the interval's loss and accuracy, so a NaN
never reaches the log as train/loss; tok/s counts every token processed, since the time was spent on them.
train/bpb is the interval's summed NLL / ln 2 / the UTF-8 bytes its target tokens stand for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from xlab.evaluation.windows import bits_per_byte


class IntervalMetrics:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_sums = torch.zeros(4, dtype=torch.float64, device=device)  # this step: loss, correct, bytes, tokens
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # interval: the same, and skipped steps
        self.grad_norm = torch.full((), float("nan"), device=device)  # of the interval's last applied update
        self.processed, self.start = 0, time.perf_counter()
        self.paused_at: float | None = None  # inside paused(): when the pause began

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, nbytes: torch.Tensor) -> None:
        """One micro-batch's summed token loss, correct predictions and target bytes."""
        self.step_sums[:3] += torch.stack([loss_sum.detach().double(), correct.double(), nbytes.double()])

    def end_step(self, dropped: torch.Tensor, grad_norm: torch.Tensor | None, tokens: int, processed: int) -> None:
        """Close a step of `tokens` target tokens on this rank (`processed` on all ranks): its sums count unless its
        update was dropped."""
        self.step_sums[3] = tokens  # a scalar fill, not a host-to-device copy
        self.sums[:4] += torch.where(dropped, torch.zeros_like(self.step_sums), self.step_sums)
        self.sums[4] += dropped.double()
        if grad_norm is not None:
            self.grad_norm = torch.where(dropped, self.grad_norm, grad_norm.detach().float())
        self.step_sums.zero_()
        self.processed += processed

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude the block (evaluation, logging, saving) from tok/s, also when it records the interval: the pause
        belongs neither to the interval that ends in it nor to the next one."""
        self.paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - self.paused_at
            self.paused_at = None

    def record(self, reduce: Callable[[torch.Tensor], torch.Tensor], world: int) -> dict[str, Any]:
        """The interval's figures (summed over ranks by `reduce`), then a fresh interval. The only host sync."""
        loss, correct, nbytes, tokens, skipped = reduce(self.sums).tolist()
        now = time.perf_counter() if self.paused_at is None else self.paused_at
        elapsed = max(now - self.start, 1e-9)
        record: dict[str, Any] = {"tok_per_s": self.processed / elapsed,
                                  "tok_per_s_per_device": self.processed / elapsed / world}
        if tokens > 0:  # else every update of the interval was dropped: no loss to report
            record = {"train/loss": loss / tokens, "train/bpb": bits_per_byte(loss, nbytes),
                      "train/accuracy": 100.0 * correct / tokens, **record}
        norm = float(self.grad_norm)
        if norm == norm:  # not NaN: some update of the interval was applied
            record["grad_norm"] = norm
        record["skipped"] = int(round(skipped / world))  # every rank counted the same dropped steps
        self.sums.zero_()
        self.processed, self.start = 0, now
        return record
