"""The training loop's counters as one object: what exact resume needs besides model, optimizer, scheduler and RNG
states (which Accelerate saves). `state_dict()` is what a checkpoint's state.json holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Best:
    """The evaluation with the lowest val loss so far."""

    step: int
    val_loss: float
    val_bpb: float | None = None


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all ranks
    skipped_steps: int = 0  # updates dropped by trainer.on_nan=skip
    sampler: dict[str, Any] = field(default_factory=dict)  # the train sampler's position (RandomWindows.state_dict)
    trackers: dict[str, str] = field(default_factory=dict)  # tracker run ids, so a resumed W&B run continues
    best: Best | None = None
    evals_since_best: int = 0  # evaluations since the best one (trainer.early_stop_patience)
    budget_steps: int | None = None  # trainer.time_budget_s: the max_steps it chose (its probe, then re-plans)
    budget_spent_s: float = 0.0  # and the seconds of training steps so far
    budget_mark: list[float] | None = None  # [step, seconds spent] at its last plan (xlab/training/budget.py)
    small_data: list[str] | None = None  # the small-data rule's changes when a budget's probe decided them
    rank_weight_checksums: list[float] = field(default_factory=list)  # at the last save: each rank's weights (DDP:
    weight_checksum: float | None = None  # equal on every rank; FSDP: its shards) and the whole model's sum

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "sampler": self.sampler, "trackers": self.trackers, "rank_weight_checksums": self.rank_weight_checksums,
                "weight_checksum": self.weight_checksum,
                "best": None if self.best is None else asdict(self.best), "evals_since_best": self.evals_since_best,
                "budget_steps": self.budget_steps, "budget_spent_s": self.budget_spent_s,
                "budget_mark": self.budget_mark, "small_data": self.small_data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads the state.json of checkpoints written before a key existed (its default is kept)."""
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.sampler = dict(state.get("sampler", {}))
        self.trackers = dict(state.get("trackers") or {})
        self.rank_weight_checksums = list(state.get("rank_weight_checksums", []))
        self.weight_checksum = state.get("weight_checksum")
        best = state.get("best")
        self.best = None if best is None else Best(**best)
        self.evals_since_best = int(state.get("evals_since_best", 0))
        budget = state.get("budget_steps")
        self.budget_steps = None if budget is None else int(budget)
        self.budget_spent_s = float(state.get("budget_spent_s", 0.0))
        mark = state.get("budget_mark")
        self.budget_mark = None if mark is None else [int(mark[0]), float(mark[1])]
        small = state.get("small_data")
        self.small_data = None if small is None else [str(change) for change in small]

    def observe_val(self, val_loss: float, val_bpb: float | None = None) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.best is None or val_loss < self.best.val_loss:
            self.best = Best(self.step, val_loss, val_bpb)
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False
