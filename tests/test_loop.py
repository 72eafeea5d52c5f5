"""The loop's cadence as a pure function (`due`), the interval clock's pause, and two defects of the old loop: an
early stop dropped the last interval's train metrics, and a resume ignored changed optimizer settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from xlab.errors import XLabError
from xlab.training import interval
from xlab.training.config import TrainConfig, TrainerConfig
from xlab.training.interval import IntervalMetrics
from xlab.training.trainer import Due, Trainer, due, train

# --- due(): what a step is due, without training ----------------------------------------------------------------

CADENCE = TrainerConfig(log_every=4, eval_every=6, ckpt_every=12, max_steps=30)


def test_periodic_steps_are_due_their_own_work_only():
    assert due(3, CADENCE) == Due(3, log=False, eval=False, save=False, last=False)
    assert due(4, CADENCE) == Due(4, log=True, eval=False, save=False, last=False)  # misaligned: log, no eval
    assert due(6, CADENCE) == Due(6, log=False, eval=True, save=False, last=False)  # and eval, no log
    assert due(12, CADENCE) == Due(12, log=True, eval=True, save=True, last=False)  # aligned: all three
    aligned = TrainerConfig(log_every=2, eval_every=4, ckpt_every=8, max_steps=30)
    assert [s for s in range(1, 17) if due(s, aligned).log] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [s for s in range(1, 17) if due(s, aligned).eval] == [4, 8, 12, 16]
    assert [s for s in range(1, 17) if due(s, aligned).save] == [8, 16]


def test_the_last_step_and_a_stop_request_are_due_everything():
    assert due(30, CADENCE) == Due(30, log=True, eval=True, save=True, last=True)  # max_steps, a multiple of none
    assert due(31, CADENCE).last  # resumed past max_steps (a run that was given fewer steps)
    assert due(5, CADENCE, stopping=True) == Due(5, log=True, eval=True, save=True, last=True, stopped=True)


def test_a_second_stop_signal_skips_the_evaluation_only():
    assert due(12, CADENCE, stopping=True, hurry=True) == Due(12, log=True, eval=False, save=True, last=True,
                                                               stopped=True)


def test_a_new_best_saves_unless_the_step_is_saved_already():
    at_eval = due(6, CADENCE)
    assert at_eval.after_eval(improved=True, stop_early=False, save_best=True) == \
        Due(6, log=False, eval=True, save=True, last=False, best=True)
    assert at_eval.after_eval(improved=True, stop_early=False, save_best=False) == at_eval
    assert at_eval.after_eval(improved=False, stop_early=False, save_best=True) == at_eval
    # resumed at the end: step 30 was saved by the run before; a new best only re-points checkpoints/best
    resumed = due(30, CADENCE, saved_step=30)
    assert not resumed.save and resumed.last and resumed.log and resumed.eval
    assert resumed.after_eval(improved=True, stop_early=False, save_best=True) == \
        Due(30, log=True, eval=True, save=False, last=True, saved=True, mark_best=True)


def test_an_early_stop_makes_the_step_last_and_logs_its_interval():
    """Step 6 is an eval step but not a log step: the early stop decided there must still log steps 5-6."""
    stop = due(6, CADENCE).after_eval(improved=False, stop_early=True, save_best=True)
    assert stop == Due(6, log=True, eval=True, save=True, last=True)


# --- the interval clock -----------------------------------------------------------------------------------------


def test_paused_time_belongs_to_no_interval(monkeypatch):
    """Evaluation before the log inside a pause: neither the interval that ends there nor the next one counts it."""
    now = [0.0]
    monkeypatch.setattr(interval.time, "perf_counter", lambda: now[0])
    metrics = IntervalMetrics(torch.device("cpu"))
    no = torch.tensor(False)
    metrics.end_step(no, None, 100, 100)
    now[0] = 10.0
    with metrics.paused():
        now[0] = 25.0  # an evaluation
        first = metrics.record(lambda x: x, 1)
        now[0] = 30.0  # a save
    metrics.end_step(no, None, 100, 100)
    now[0] = 40.0
    second = metrics.record(lambda x: x, 1)
    assert first["tok_per_s"] == 10.0 and second["tok_per_s"] == 10.0


# --- in-process runs --------------------------------------------------------------------------------------------



def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_early_stopped_run_logs_its_last_interval(tmp_path: Path):
    """lr 1e-30 leaves the weights as they are, so the evaluation at step 6 is no better than step 3's and patience 1
    stops there; step 6 is not a log step (log_every 4): the old loop never wrote the train metrics of steps 5-6."""
    cfg = tiny_config(max_steps=40, log_every=4, eval_every=3, early_stop_patience=1)
    cfg.optimizer.lr = 1e-30
    train(cfg, tmp_path)
    rows = records(tmp_path)
    assert max(r["step"] for r in rows) == 6
    trained = [r["step"] for r in rows if "train/loss" in r]
    assert trained == [4, 6]
    assert json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())["step"] == 6


def resume_config(**optimizer) -> TrainConfig:
    cfg = tiny_config(max_steps=4)
    cfg.scheduler.update(name="constant", warmup_steps=0)
    cfg.optimizer.update(**optimizer)
    return cfg


def changed_on_resume(run: Path, name: str, caplog) -> Trainer:
    """Train 4 steps with lr 3e-3, weight decay 1.0, betas (0.9, 0.95); resume to 8 with other values of all three."""
    train(resume_config(name=name, lr=3e-3, weight_decay=1.0), run)
    cfg = resume_config(name=name, lr=1e-3, weight_decay=0.5, betas=[0.9, 0.99])
    cfg.trainer.max_steps, cfg.resume = 8, "auto"
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg, run)
    assert "resume: optimizer.lr 0.003 -> 0.001, optimizer.weight_decay 1.0 -> 0.5, optimizer.betas [0.9, 0.95] -> " \
           "[0.9, 0.99] applied" in caplog.text
    return trainer


def test_a_resume_applies_the_configured_optimizer_settings(tmp_path: Path, caplog):
    """The old loop kept the checkpoint's lr, weight decay and betas (load_state restores param groups and the
    schedule's base lrs) although the new values were in config.yaml."""
    trainer = changed_on_resume(tmp_path, "adamw", caplog)
    decay, no_decay, embed = trainer.optimizer.param_groups  # the embeddings train at 3 x lr (embed_lr_scale)
    assert (decay["lr"], decay["initial_lr"], decay["weight_decay"], decay["betas"]) == (1e-3, 1e-3, 0.5, (0.9, 0.99))
    assert no_decay["weight_decay"] == 0.0 and no_decay["betas"] == (0.9, 0.99)
    assert (embed["weight_decay"], embed["betas"]) == (0.0, (0.9, 0.99))
    assert trainer.scheduler.scheduler.base_lrs == pytest.approx([1e-3, 1e-3, 3e-3])
    trainer.fit()
    assert [r["lr"] for r in records(tmp_path) if "lr" in r] == [3e-3, 3e-3, 1e-3, 1e-3]  # steps 2, 4 | 6, 8


def test_a_resume_applies_the_configured_settings_to_both_muon_optimizers(tmp_path: Path, caplog):
    """Muon steps two torch optimizers: each must get the new values, and the schedule must reach them after the
    checkpoint's param groups replaced theirs."""
    trainer = changed_on_resume(tmp_path, "muon", caplog)
    muon, adam = trainer.optimizer.optimizer.optimizers
    trainer.fit()
    assert muon.param_groups[0]["lr"] == 1e-3 and muon.param_groups[0]["weight_decay"] == 0.5
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([1e-3, 1e-3, 3e-3])  # embeddings: 3 x lr
    assert [g["betas"] for g in adam.param_groups] == [(0.9, 0.99)] * 3
    assert [g["weight_decay"] for g in adam.param_groups] == [0.5, 0.0, 0.0]


def test_an_unchanged_resume_logs_no_optimizer_change(tmp_path: Path, caplog):
    train(resume_config(), tmp_path)
    cfg = resume_config()
    cfg.trainer.max_steps, cfg.resume = 6, "auto"
    with caplog.at_level(logging.INFO):
        Trainer(cfg, tmp_path).fit()
    assert "resumed from" in caplog.text and "resume: optimizer." not in caplog.text
    assert [r["lr"] for r in records(tmp_path) if "lr" in r] == [3e-3] * 3


def test_an_lr_scale_changes_on_resume_but_not_to_or_from_1(tmp_path: Path):
    """optimizer.embed_lr_scale gives the embeddings a param group of its own where it is not 1: a resume may change
    the scale (the group's lr follows), and is refused, naming the key and what is valid, where the groups differ."""
    train(resume_config(embed_lr_scale=3.0, head_lr_scale=0.5), tmp_path)
    cfg = resume_config(embed_lr_scale=1.0, head_lr_scale=0.5)
    cfg.trainer.max_steps, cfg.resume = 8, "auto"
    with pytest.raises(XLabError, match=r"optimizer.embed_lr_scale=1: it trained with 3.*valid: "
                                        r"optimizer.embed_lr_scale=any value but 1"):
        Trainer(cfg, tmp_path)
    cfg.optimizer.embed_lr_scale = 5.0
    trainer = Trainer(cfg, tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.tok_emb.weight)] == pytest.approx(5 * 3e-3)
    assert lr_of[id(model.lm_head.weight)] == pytest.approx(0.5 * 3e-3)
    trainer.fit()
    assert [r["step"] for r in records(tmp_path) if "lr" in r] == [2, 4, 6, 8]
