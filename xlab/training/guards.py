"""The training loop's two policies: what a non-finite loss does (`trainer.on_nan`), and what a stop signal does.

Both decide without a host sync on the step path: the NaN check runs on the device and the optimizer skips the
update itself; the stop request is a flag set by a signal handler, voted on by the ranks where they sync anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch

from xlab.training.config import OnNan

log = logging.getLogger(__name__)


def found_inf_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer behind `optimizer` when it can skip an update on the device: fused Adam/AdamW read a
    `found_inf` tensor (GradScaler's mechanism) and, when it is non-zero, leave weights, moments and step count as
    they were. None otherwise (other optimizers, or fp16 with a GradScaler, which sets found_inf itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
    if getattr(optimizer, "scaler", None) is not None:
        return None
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused"):
        return inner
    return None


class NanGuard:
    """A step whose loss (or gradient norm) is not finite applies no update.

    skip: only that update is dropped, and counted. stop: once a step is bad every later update is dropped too, so
    the weights stay those before the first bad step until the next log step, where the loop saves them and fails.
    The check and the drop stay on the device; only an optimizer without found_inf needs a host sync per step (free
    on a CPU, which runs synchronously anyway)."""

    def __init__(self, policy: OnNan | str, optimizer: Any, device: torch.device, reduce=None) -> None:
        self.policy = OnNan(policy)
        self.optimizer = optimizer
        self.reduce = reduce  # sum over ranks: every rank must drop the same updates
        self.found_inf = found_inf_optimizer(optimizer)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first bad step number, or -1

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Whether this update must be dropped (a bool tensor on the device)."""
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        if self.reduce is not None:
            bad = self.reduce(bad.float()) > 0
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)
        if self.policy is OnNan.stop:
            bad = bad | (self.first_bad >= 0)  # frozen at the last good weights until the loop stops
        return bad

    def step(self, bad: torch.Tensor) -> None:
        """optimizer.step(), unless `bad`."""
        if self.found_inf is None:
            if not bool(bad):
                self.optimizer.step()
            return
        self.found_inf.found_inf = bad.float()
        try:
            self.optimizer.step()
        finally:
            del self.found_inf.found_inf

    def bad_step(self) -> int:
        """The first bad step so far, 0 if none (a host sync: call at log steps)."""
        return max(0, int(self.first_bad))


class StopRequest:
    """SIGTERM (SLURM preemption, `kill`) and SIGINT (Ctrl-C) stop training, and never interrupt a save:
    1st signal: the loop finishes its step, evaluates, saves a checkpoint and exits 0; `resume=auto` continues there.
    2nd signal: hurry: no more steps or evaluations; the save in progress is finished (or, when the step is not saved
                yet, the stop's checkpoint written), then the run exits 0 (`hurried()`).
    3rd signal: the signal's default action, at once: a checkpoint being written is lost, `last` stays on the one
                before (saves are atomic)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.signal = signum
            self._say("received %s: stopping after this step and saving a checkpoint", name)
        elif self.count == 2:
            self._say("received %s again: no more steps or evaluation, exiting once the checkpoint is written; "
                      "a third signal kills the run at once, without it", name)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @staticmethod
    def _say(msg: str, *args: object) -> None:
        """Log from another thread: the signal may land while this thread is inside a write of the same log file,
        and logging from the handler would re-enter it (RuntimeError: reentrant call); the thread waits for the
        handler's lock instead."""
        threading.Thread(target=log.warning, args=(msg, *args)).start()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return self.signal is not None

    def hurried(self) -> bool:
        return self.count >= 2
