"""`trainer.time_budget_s`: train for a given number of seconds on this machine, with a schedule that ends there.

The time of the first PROBE_STEPS steps after the first one (which pays for allocations and any torch.compile) is
measured; max_steps becomes the steps done plus as many more as fit in the rest of the budget at that step time, so
the learning-rate schedule decays exactly at the budget's end. The budget counts training steps only: start-up,
evaluations and checkpoints are not in it (they depend on the cadence one picks, not on the recipe). The chosen count
is recorded in state.json (`budget_steps`): a resumed run continues the same schedule instead of measuring again.
"""

from __future__ import annotations

import math
import statistics

PROBE_STEPS = 10  # timed steps after the first: enough for a stable median, short against any useful budget


class TimeBudget:
    """Collects step times and, once the probe is complete, says how many steps the whole run gets."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.times: list[float] = []  # seconds of each step so far, the first one included

    @property
    def probing(self) -> bool:
        return len(self.times) <= PROBE_STEPS

    def observe(self, step: int, seconds: float) -> int | None:
        """Record the time of optimizer step `step` (1-based); at the probe's last step, the run's total steps."""
        self.times.append(seconds)
        if len(self.times) != PROBE_STEPS + 1:
            return None
        return step + max(0, math.floor((self.seconds - sum(self.times)) / self.step_time))

    @property
    def step_time(self) -> float:
        """The median time of the probe's steps (the first step left out)."""
        return statistics.median(self.times[1:PROBE_STEPS + 1])
