"""trainer.time_budget_s: max_steps set from the step time measured over the first steps, recorded in state.json,
and a resume that continues the same schedule bit for bit."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, tiny_config
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


def test_steps_slower_than_the_probe_are_caught_by_the_re_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog):
    """Steps that turn twice as slow after the probe (a VM's speed drifts): the plan made from the probe would run
    ~1.7x over the budget; the re-plans end the run within a step of it, and the schedule still decays to 0 there."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += STEP_SECONDS if now[0] < 1.0 else 2 * STEP_SECONDS
        return now[0]

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=perf_counter))
    cfg = budget_config()
    cfg.trainer.time_budget_s = 2.5
    with caplog.at_level(logging.INFO):
        train(cfg, tmp_path)
    probe_plan = int(re.search(r"over the probe's last 10 steps, so max_steps=(\d+) ", caplog.text)[1])
    assert " of 2.5 s spent at step" in caplog.text and "at this pace max_steps=" in caplog.text
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == state["budget_steps"] < probe_plan
    assert 2.5 - 2 * STEP_SECONDS < state["budget_spent_s"] <= 2.5
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if "lr" in r}
    assert max(lrs) == state["step"] and lrs[state["step"]] == 0.0


def test_re_plans_come_at_fractions_of_the_plan_and_use_the_pace_since_the_last():
    budget = TimeBudget(10.0)
    plan = [budget.observe(step, 0.25) for step in range(1, PROBE_STEPS + 2)][-1]
    assert plan == 40 and budget.next_replan(plan) == 20  # 0.25 x 40 = 10 is behind the probe's step 11
    assert [budget.observe(step, 0.5, plan) for step in range(12, 21)][-1] == 20 + int((10.0 - 2.75 - 4.5) // 0.5)
    # a 25-step plan's re-plan steps are 6, 12, 19 and 22: 22 would time only 2 steps since step 20, so none is left
    assert budget.next_replan(25) is None and budget.observe(22, 0.5, 25) is None
    assert budget.next_replan(60) == 30  # a longer plan: 30 is 10 steps (1/6 of it) past the last re-plan


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


def resumed(whole: Path, part: Path, step: int, cfg) -> dict[Path, Path]:
    """A run killed after its step-`step` checkpoint (a copy of `whole`'s) resumed with resume=auto under `cfg`; the
    last checkpoint of each run."""
    name = f"step_{step:06d}"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / name, part / "checkpoints" / name)
    (part / "checkpoints" / "last").symlink_to(name)
    cfg.resume = "auto"
    train(cfg, part)
    return {run: (run / "checkpoints" / "last").resolve() for run in (whole, part)}


def test_a_resumed_budget_run_continues_the_same_schedule_bit_for_bit(tmp_path: Path, fake_clock):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(budget_config(), whole)
    last = resumed(whole, part, 12, budget_config())
    assert last[whole].name == last[part].name == "step_000020"
    assert (last[part] / "model.safetensors").read_bytes() == (last[whole] / "model.safetensors").read_bytes()
    assert [r["lr"] for r in records(part) if r["step"] > 12 and "lr" in r] == \
           [r["lr"] for r in records(whole) if r["step"] > 12 and "lr" in r]


def small_data_budget_config(**trainer):
    """The fixture corpus (~60k train tokens at vocab 300), 2048 tokens a step: 5 s at the fake clock's 0.0625 s a
    step allow 80 steps, ~2.7 epochs (the test sets the rule's threshold to 2); the configured 20 would make ~0.7."""
    cfg = tiny_config(time_budget_s=5.0, max_steps=20, batch_size=64, log_every=20, eval_every=40, ckpt_every=40,
                      **trainer)
    cfg.data.update(name="text_files", data_files="tests/fixtures/ckpt_435677f/corpus.jsonl")
    cfg.tokenizer.vocab_size = 300
    cfg.optimizer.weight_decay = 1.0
    return cfg


def test_with_a_budget_the_small_data_rule_counts_the_steps_the_budget_allows(tmp_path: Path, fake_clock, caplog,
                                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    # the first tier past 2 epochs (12 in earnest: 6x the steps, the same logic)
    monkeypatch.setattr(trainer_module, "SMALL_DATA_TIERS", ((2.0, trainer_module.SMALL_DATA_TIERS[0][1]),))
    whole, part = tmp_path / "whole", tmp_path / "part"
    with caplog.at_level(logging.INFO):
        train(small_data_budget_config(), whole)
    text = caplog.text
    assert "training with model.dropout=0.1 optimizer.weight_decay=2.0" in text
    # decided after the probe, from its steps; then the dearer steps are timed again for the rest of the budget
    assert text.index("small data (") < text.index("timing the next steps") < text.index("so max_steps=80")
    state = json.loads((whole / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 80 and state["small_data"] == ["model.dropout=0.1", "optimizer.weight_decay=2.0"]
    config = (whole / "checkpoints" / "last" / "config.yaml").read_text()
    assert "dropout: 0.1" in config and "weight_decay: 2.0" in config
    last = resumed(whole, part, 40, small_data_budget_config())  # the resume applies the rule as decided
    assert last[whole].name == last[part].name == "step_000080"
    assert (last[part] / "model.safetensors").read_bytes() == (last[whole] / "model.safetensors").read_bytes()
