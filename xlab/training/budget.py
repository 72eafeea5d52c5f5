"""`trainer.time_budget_s`: train for a given number of seconds on this machine, with a schedule that ends there.

The time of the first PROBE_STEPS steps after the first one (which pays for allocations and any torch.compile) is
measured; max_steps becomes the steps done plus as many more as fit in the rest of the budget at that step time, so
the learning-rate schedule decays at the budget's end. Steps do not keep the probe's pace (a VM's speed drifts by
10-20% within minutes; the first steps of a run are not its typical ones), so the plan is made again at
REPLAN_FRACTIONS of it (REPLAN_MIN_WINDOW apart), from the mean step time since the last plan: the run ends within a
few steps of the budget.
The budget counts training steps only: start-up, evaluations and checkpoints are not in it (they depend on the
cadence one picks, not on the recipe). The plan and the seconds spent are recorded in state.json (`budget_steps`,
`budget_spent_s`, `budget_mark`): a resumed run continues the same schedule instead of measuring again.
"""

from __future__ import annotations

import math
import statistics

PROBE_STEPS = 10  # timed steps after the first: enough for a stable median, short against any useful budget
# where the plan is made again, as fractions of the planned steps: steps, not seconds, so that every rank of a
# distributed run re-plans at the same step
REPLAN_FRACTIONS = (0.25, 0.5, 0.75, 0.9)
# a re-plan times at least this fraction of the plan since the last one: a new horizon moves the fractions' steps, and
# one just past the last re-plan would time a handful of steps (one slow step would then move the end by percents)
REPLAN_MIN_WINDOW = 0.1


class TimeBudget:
    """Collects step times; says how many steps the whole run gets once the probe is complete, and again at each
    re-plan."""

    def __init__(self, seconds: float, spent: float = 0.0, mark: tuple[int, float] | None = None) -> None:
        self.seconds = seconds
        self.spent = spent  # seconds of the steps so far
        self.times: list[float] = []  # seconds of each probe step, the first one included
        self.mark = mark  # (step, spent) when the last plan was made; None while probing

    @property
    def probing(self) -> bool:
        return self.mark is None

    def probe_again(self) -> None:
        """Time the next steps afresh (their cost changed: the small-data rule added dropout)."""
        self.times, self.mark = [], None

    def next_replan(self, horizon: int) -> int | None:
        """The step of the next re-plan of a run planned to end at `horizon` (None: no more, or still probing)."""
        if self.mark is None:
            return None
        earliest = self.mark[0] + max(1.0, REPLAN_MIN_WINDOW * horizon)
        return next((s for f in REPLAN_FRACTIONS if earliest <= (s := round(f * horizon)) < horizon), None)

    def observe(self, step: int, seconds: float, horizon: int | None = None) -> int | None:
        """Record the time of optimizer step `step` (1-based). At the probe's last step and at each re-plan step of
        the current `horizon`, the run's total steps; else None."""
        self.spent += seconds
        if self.mark is None:
            self.times.append(seconds)
            return self._plan(step, self.step_time) if len(self.times) == PROBE_STEPS + 1 else None
        if horizon is None or step != self.next_replan(horizon):
            return None
        mark_step, mark_spent = self.mark
        return self._plan(step, (self.spent - mark_spent) / (step - mark_step))

    def _plan(self, step: int, step_time: float) -> int:
        self.mark = (step, self.spent)
        return step + max(0, math.floor((self.seconds - self.spent) / max(step_time, 1e-9)))

    @property
    def step_time(self) -> float:
        """The median time of the probe's steps (the first step left out)."""
        return statistics.median(self.times[1:PROBE_STEPS + 1])
