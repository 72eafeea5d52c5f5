"""The Trainer's contracts, one test per defect of the old loop: NaN policies, accumulation, defaults in one place,
resume compatibility (also with a checkpoint written by the old code), batch transfer and durable checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli, tiny_config
from omegaconf import OmegaConf
from safetensors.torch import load_file

from xlab.training.config import TrainConfig
from xlab.training.trainer import Trainer, to_device, train

FIXTURE = REPO / "tests" / "fixtures" / "ckpt_435677f"
# The fixture run's command line (tests/fixtures/ckpt_435677f/README.md); data_files is relative to the repo root.
FIXTURE_RUN = [
    "model=gpt",  # 435677f's default model: resuming one of its runs now names it (the default is the Llama block)
    "model.n_layer=1", "model.n_head=2", "model.d_model=16", "model.max_len=32", "tokenizer.vocab_size=300",
    "data=text_files", "data.data_files=tests/fixtures/ckpt_435677f/corpus.jsonl", "trainer.batch_size=4",
    "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=3",
    "trainer.eval_batches=2", "scheduler.warmup_steps=2", "trainer.precision=fp32", "logger=none",
    "scheduler=cosine", "optimizer.weight_decay=0.1",  # and its schedule and decay (the defaults are now linear, 1.0)
    "optimizer.embed_lr_scale=1",  # and its one lr (the embeddings now train at 3x lr, in a param group of their own)
]
DIVERGE = [*TINY, "optimizer.lr=1e30", "scheduler.warmup_steps=0", "trainer.precision=fp32", "trainer.max_steps=6",
           "trainer.log_every=3", "trainer.eval_batches=1"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "tok_per_s" in r]


# --- NaN policies ---------------------------------------------------------------------------------------------


def test_skip_when_every_step_of_an_interval_is_bad(tmp_path: Path):
    """Every update dropped from step 1 on (the old loop raised UnboundLocalError on grad_norm at the log step)."""
    # GPT-2's LayerNorm'd block overflows from step 1 at this init (RMSNorm can tame it for a step)
    run_cli("train", *DIVERGE, "model=gpt", "model.init_std=1e30", "trainer.on_nan=skip", f"hydra.run.dir={tmp_path}")
    rows = train_records(tmp_path)
    assert [r["skipped_steps"] for r in rows] == [3, 6]
    assert all("train/loss" not in r and "grad_norm" not in r for r in rows)  # nothing applied, nothing to report


def test_skipped_steps_add_nothing_to_the_train_loss(tmp_path: Path):
    run_cli("train", *DIVERGE, "trainer.on_nan=skip", f"hydra.run.dir={tmp_path}")
    rows = train_records(tmp_path)
    assert rows[-1]["skipped_steps"] >= 1
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["grad_norm"]) for r in rows if "train/loss" in r)
    assert "train/loss" in rows[0]  # step 1 was a good update: interval 1 reports its loss


def test_stop_keeps_the_last_good_weights(tmp_path: Path):
    """The loss turns NaN at step 2; the run stops at the next log step (3) and nan_step_000002 holds the weights
    after step 1: equal to those of a run that ends after step 1."""
    proc = run_cli("train", *DIVERGE, f"hydra.run.dir={tmp_path / 'stop'}", check=False)
    assert proc.returncode == 2 and "the loss became NaN/inf at step 2" in proc.stderr
    debug = tmp_path / "stop" / "checkpoints" / "nan_step_000002"
    run_cli("train", *DIVERGE, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'one'}")
    good = load_file(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors")
    saved = load_file(debug / "model.safetensors")
    assert saved.keys() == good.keys()
    assert all(torch.equal(saved[k], good[k]) for k in good)
    assert json.loads((debug / "state.json").read_text())["step"] == 1


# --- accumulation, defaults -------------------------------------------------------------------------------------



def test_accumulation_through_the_trainer_equals_the_big_batch(tmp_path: Path):
    """grad_accum_steps=2 with batch B trains like grad_accum_steps=1 with batch 2B: same data, loss curve, weights."""
    # eval_batches x batch_size windows: 16 in both runs, so they score the same val tokens
    runs = {"accum": dict(batch_size=4, grad_accum_steps=2, eval_batches=4),
            "big": dict(batch_size=8, grad_accum_steps=1, eval_batches=2)}
    for name, trainer in runs.items():
        train(tiny_config(**trainer), tmp_path / name)
    curves = {name: [(r["step"], r["tokens"], r.get("train/loss"), r.get("val/loss")) for r in records(tmp_path / name)]
              for name in runs}
    assert [c[:2] for c in curves["accum"]] == [c[:2] for c in curves["big"]]
    for a, b in zip(curves["accum"], curves["big"]):
        for x, y in zip(a[2:], b[2:]):
            assert (x is None and y is None) or abs(x - y) < 1e-5, (a, b)
    weights = [load_file(tmp_path / n / "checkpoints" / "last" / "model.safetensors") for n in runs]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])


def test_python_api_defaults_are_the_cli_defaults():
    """TrainConfig() is the run `python -m xlab.train` makes with no arguments (one source of defaults)."""
    from test_config import composed

    cli = composed()
    api = OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=True)
    assert cli == api


def test_group_yaml_files_set_only_what_differs_from_the_dataclasses():
    import dataclasses

    import yaml

    from xlab.data.config import DataConfig, TokenizerConfig
    from xlab.generation.config import SamplerConfig
    from xlab.models.config import ModelConfig
    from xlab.training.config import LoggerConfig, OptimizerConfig, SchedulerConfig, TrainerConfig

    groups = {"model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "optimizer": OptimizerConfig,
              "scheduler": SchedulerConfig, "trainer": TrainerConfig, "logger": LoggerConfig, "sampler": SamplerConfig}
    restated = []
    for group, schema in groups.items():
        defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
        for path in sorted((REPO / "configs" / group).glob("*.yaml")):
            for key, value in (yaml.safe_load(path.read_text()) or {}).items():
                if key in defaults and key != "name" and defaults[key] == value:
                    restated.append(f"{path.name}: {key}")
        assert {f.name for f in dataclasses.fields(schema)} >= set(defaults)
    assert not restated, restated


# --- resume compatibility and checkpoints of the old code -------------------------------------------------------


def fixture_run(tmp_path: Path, edit_config=None) -> Path:
    """A run dir whose `last` is the fixture's step-3 checkpoint (written by commit 435677f)."""
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(FIXTURE / "step_000003", ckpts / "step_000003")
    (ckpts / "last").symlink_to("step_000003")
    if edit_config:
        config = ckpts / "step_000003" / "config.yaml"
        config.write_text(edit_config(config.read_text()))
    return tmp_path / "run"


def test_old_checkpoint_resumes_to_the_old_codes_numbers(tmp_path: Path):
    run = fixture_run(tmp_path)
    proc = run_cli("train", *FIXTURE_RUN, "resume=auto", f"hydra.run.dir={run}")
    # the old code's config.yaml lacks the keys added since: one line names each and the default that fills it
    (line,) = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "predates" in ln]
    assert "today's defaults fill them: " in line and "trainer.time_budget_s=None" in line, line
    old = [json.loads(line) for line in (FIXTURE / "metrics_uninterrupted.jsonl").read_text().splitlines()]
    new = records(run)
    for key in ("train/loss", "train/accuracy", "grad_norm", "lr", "val/loss", "val/accuracy"):
        want = [(r["step"], r[key]) for r in old if key in r and r["step"] > 3]
        got = [(r["step"], r[key]) for r in new if key in r]
        assert len(got) == len(want) and all(g[0] == w[0] and abs(g[1] - w[1]) < 1e-6 for g, w in zip(got, want)), key


def test_old_checkpoint_evaluates_and_generates_as_before(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "step_000003", ckpt)
    run_cli("evaluate", f"ckpt={ckpt}", "split=test", "precision=fp32", cwd=REPO)
    got, want = (json.loads(p.read_text()) for p in (ckpt / "eval_test.json", FIXTURE / "eval_test_expected.json"))
    assert got["tokens"] == want["tokens"] and abs(got["loss"] - want["loss"]) < 1e-6
    out = run_cli("generate", f"ckpt={ckpt}", "prompt=The ", "sampler=greedy", "max_new_tokens=8", "output=jsonl")
    expected = json.loads((FIXTURE / "generate_expected.jsonl").read_text().splitlines()[-1])
    assert json.loads(out.stdout.splitlines()[-1])["tokens"] == expected["tokens"]


def test_resume_accepts_changes_that_keep_the_weights_meaning(tmp_path: Path):
    """dropout, z_loss and attn_impl may change on resume; a config written before attn_impl existed is read with
    its default (the old loop refused both: "model.attn_impl (checkpoint None, now 'auto')")."""
    run = fixture_run(tmp_path, lambda text: text.replace("  attn_impl: auto\n", ""))
    ok = run_cli("train", *FIXTURE_RUN, "model.dropout=0.1", "model.z_loss=1e-4", "model.attn_impl=sdpa",
                 "resume=auto", f"hydra.run.dir={run}")
    assert "resumed from" in ok.stderr + ok.stdout
    proc = run_cli("train", *FIXTURE_RUN, "model.logit_softcap=30", "trainer.max_steps=9", "resume=auto",
                   f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "model.logit_softcap (checkpoint None, now 30.0)" in proc.stderr


# --- batch transfer and durable checkpoints ---------------------------------------------------------------------


def test_batches_go_to_a_gpu_through_pinned_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", k.get("non_blocking"))) or self)
    x = torch.zeros(2, 3, dtype=torch.long)
    to_device((x, x), torch.device("cuda"))
    assert calls == ["pin", ("to", True)] * 2
    calls.clear()
    to_device((x,), torch.device("cpu"))
    assert calls == [("to", None)]  # on a CPU, no pinning and no pretend-asynchronous copy


def test_a_checkpoint_is_durable_its_directory_entry_included(tmp_path: Path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    trainer = Trainer(tiny_config(max_steps=2, ckpt_every=2), tmp_path)
    trainer.fit()
    root = str((tmp_path / "checkpoints").resolve())
    step_dir = str((tmp_path / "checkpoints" / ".tmp_step_000002").resolve())  # synced before its rename
    assert root in synced and any(p.startswith(step_dir + "/") for p in synced)
    assert synced.index(root) > max(i for i, p in enumerate(synced) if p.startswith(step_dir + "/"))


def test_trainer_state_is_what_the_checkpoint_holds(tmp_path: Path):
    trainer = Trainer(tiny_config(max_steps=4, eval_every=2), tmp_path)
    trainer.fit()
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state == trainer.state.state_dict()
    assert state["step"] == 4 and state["tokens"] == 4 * 16 * 32 and state["sampler"] == {"batches_drawn": 4}
    vals = [r["val/loss"] for r in records(tmp_path) if "val/loss" in r]
    bpbs = [r["val/bpb"] for r in records(tmp_path) if "val/bpb" in r]
    best = vals.index(min(vals))
    assert state["best"] == {"step": 2 * (1 + best), "val_loss": min(vals), "val_bpb": bpbs[best]}


@pytest.mark.parametrize("key", ["trainer.on_nan=ignore", "model.attn_impl=flash", "trainer.strategy=zero3"])
def test_closed_choices_are_refused_by_the_schema_with_the_valid_ones(key: str, tmp_path: Path):
    proc = run_cli("train", *TINY, key, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "expected one of [" in proc.stderr
    assert key.split("=")[1] in proc.stderr and not (tmp_path / "run").exists()
