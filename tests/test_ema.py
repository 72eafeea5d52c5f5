"""trainer.ema_decay: the average is what is evaluated and saved as model.safetensors, training itself is untouched
(the trained weights, saved beside it, are those of the same run without averaging), and a resume continues both
bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_budget import resumed
from test_loop import records

from xlab.datamodules import XLabDataModule
from xlab.evaluation.windows import score_windows
from xlab.models import XLabModel
from xlab.training.ema import TRAIN_WEIGHTS
from xlab.training.trainer import train


def ema_config(**trainer):
    return tiny_config(max_steps=12, eval_every=6, ckpt_every=6, log_every=2, **trainer)


def last(run: Path) -> Path:
    return (run / "checkpoints" / "last").resolve()


def test_the_average_is_evaluated_and_saved_and_training_is_untouched(tmp_path: Path):
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    train(ema_config(), plain)
    cfg = ema_config(ema_decay=0.9)
    val = train(cfg, averaged)
    trained, plain_weights = load_file(last(averaged) / TRAIN_WEIGHTS), load_file(last(plain) / "model.safetensors")
    assert trained.keys() == plain_weights.keys() and all(torch.equal(trained[k], plain_weights[k]) for k in trained)
    assert [r["train/loss"] for r in records(averaged) if "train/loss" in r] == \
           [r["train/loss"] for r in records(plain) if "train/loss" in r]
    average = load_file(last(averaged) / "model.safetensors")
    assert any(not torch.equal(average[k], trained[k]) for k in average)
    # the val loss the run logged is that of the weights in model.safetensors, scored on the same windows
    model = XLabModel.load_from_checkpoint(last(averaged)).eval()
    data = XLabDataModule.load_from_checkpoint(last(averaged))
    windows = data.eval_windows("val", cfg.model.max_len, cfg.trainer.batch_size, cfg.trainer.eval_batches)
    scored = score_windows(model, windows, torch.device("cpu"), byte_lengths=torch.as_tensor(
        data.tokenizer.byte_lengths()))
    assert scored["loss"] == pytest.approx(val["loss"], rel=1e-6)
    plain_val = [r["val/loss"] for r in records(plain) if "val/loss" in r][-1]
    assert val["loss"] != pytest.approx(plain_val, rel=1e-6)  # the average, not the trained weights, was scored


def test_a_resumed_averaging_run_is_the_whole_run_bit_for_bit(tmp_path: Path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(ema_config(ema_decay=0.9), whole)
    resumed(whole, part, 6, ema_config(ema_decay=0.9))  # killed after its step-6 checkpoint
    assert last(whole).name == last(part).name == "step_000012"
    for name in ("model.safetensors", TRAIN_WEIGHTS):
        assert (last(part) / name).read_bytes() == (last(whole) / name).read_bytes(), name
