"""The training loop in-process: it learns, accumulation is exact, and schedules follow their formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from omegaconf import OmegaConf

from xlab.data.datamodule import XLabDataModule
from xlab.models import XLabModel
from xlab.training.config import TrainConfig
from xlab.training.trainer import train


def tiny_config(**trainer) -> TrainConfig:
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.update(n_layer=2, n_head=2, d_model=64, max_len=64)
    cfg.logger.trackers = []
    cfg.trainer.update(**{"batch_size": 8, "eval_batches": 4, "log_every": 50, "eval_every": 1000,
                          "ckpt_every": 1000, **trainer})
    return cfg


def test_loss_falls_far_below_uniform_and_unigram(tmp_path):
    cfg = tiny_config(max_steps=600, batch_size=16)
    cfg.optimizer.lr = 3e-3
    val = train(cfg, tmp_path)
    uniform = math.log(4096)
    # A model that ignores context can at best reach the unigram entropy of the train tokens.
    train_tokens = XLabDataModule(cfg.data, cfg.tokenizer, cfg.paths.cache_dir).tokens("train")
    p = np.bincount(train_tokens, minlength=4096) / len(train_tokens)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    assert val["loss"] < uniform - 2.5, val  # a broken model or data path stays near ln(vocab) = 8.3
    assert val["loss"] < unigram - 0.5, (val, unigram)
    train_losses = [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
                    if "train/loss" in x]
    assert train_losses[-1] < uniform - 2.5


def test_accumulated_gradient_equals_big_batch_gradient():
    """Sum-of-token-losses / token count over micro-batches gives the big batch's mean-loss gradient."""
    torch.manual_seed(0)
    model = XLabModel(50, n_layer=1, n_head=2, d_model=16, max_len=8)
    x = torch.randint(0, 50, (6, 8))
    y = torch.randint(0, 50, (6, 8))
    loss = model(x, targets=y).objective
    (loss / y.numel()).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for xs, ys in ((x[:2], y[:2]), (x[2:], y[2:])):  # unequal micro-batches
        loss = model(xs, targets=ys).objective
        (loss / y.numel()).backward()
    for a, b in zip(big, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
