"""trainer.time_budget_s: max_steps set from the step time measured over the first steps, recorded in state.json,
and a resume that continues the same schedule bit for bit."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_config
from test_loop import records

from xlab.training import trainer as trainer_module
from xlab.training.budget import PROBE_STEPS, TimeBudget
from xlab.training.trainer import train

STEP_SECONDS = 0.0625  # what the fake clock below makes every step take (a power of 2: exact arithmetic)


def test_the_probe_chooses_the_steps_that_fit_in_the_rest_of_the_budget():
    budget = TimeBudget(10.0)
    chosen = [budget.observe(step, 1.5 if step == 1 else 0.25) for step in range(1, PROBE_STEPS + 2)]
    assert chosen[:-1] == [None] * PROBE_STEPS and not budget.probing
    spent = 1.5 + PROBE_STEPS * 0.25
    assert chosen[-1] == PROBE_STEPS + 1 + int((10.0 - spent) // 0.25)
    assert budget.step_time == 0.25  # the first step (allocations, compile) is left out of the median
    short = TimeBudget(1.0)  # spent before the probe ends: the run stops there
    assert [short.observe(s, 0.5) for s in range(1, PROBE_STEPS + 2)][-1] == PROBE_STEPS + 1


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch):
    """The trainer's clock advances STEP_SECONDS per reading: each step (timed by two readings) takes STEP_SECONDS."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += STEP_SECONDS
        return now[0]

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=perf_counter))


def budget_config(**trainer):
    cfg = tiny_config(time_budget_s=1.25, max_steps=1000, log_every=2, eval_every=6, ckpt_every=12, **trainer)
    cfg.scheduler.update(name="linear", warmup_steps=4)
    return cfg


def test_the_budget_sets_max_steps_and_the_schedule_decays_at_its_end(tmp_path: Path, fake_clock, caplog):
    with caplog.at_level(logging.INFO):
        train(budget_config(), tmp_path)
    # 11 probe steps took 0.6875 s; 0.5625 s more at 0.0625 s per step: 9 steps
    expected = PROBE_STEPS + 1 + 9
    assert f"so max_steps={expected} (trainer.max_steps=1000 set aside)" in caplog.text
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == state["budget_steps"] == expected
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if "lr" in r}
    assert max(lrs) == expected and lrs[expected] == 0.0  # linear decay to 0 at the budget's end, not at 1000
    assert 0 < lrs[12] < lrs[6]


def test_a_resumed_budget_run_continues_the_same_schedule_bit_for_bit(tmp_path: Path, fake_clock):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(budget_config(), whole)
    (part / "checkpoints").mkdir(parents=True)  # a run killed after its step-12 checkpoint
    shutil.copytree(whole / "checkpoints" / "step_000012", part / "checkpoints" / "step_000012")
    (part / "checkpoints" / "last").symlink_to("step_000012")
    cfg = budget_config()
    cfg.resume = "auto"
    train(cfg, part)
    last = {run: (run / "checkpoints" / "last").resolve() for run in (whole, part)}
    assert last[whole].name == last[part].name == "step_000020"
    assert (last[part] / "model.safetensors").read_bytes() == (last[whole] / "model.safetensors").read_bytes()
    assert [r["lr"] for r in records(part) if r["step"] > 12 and "lr" in r] == \
           [r["lr"] for r in records(whole) if r["step"] > 12 and "lr" in r]
