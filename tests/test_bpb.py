"""Bits per byte, best checkpoints, early stopping, the epoch warning and the results table, through the real CLIs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from xlab.data.config import TokenizerConfig
from xlab.data.tokenizer import TOKENIZERS, XLabTokenizer
from xlab.evaluation.windows import score_windows as evaluate
from xlab.models import XLabModel

TEXT = "Hello wörld — naïve café, 你好 🙂\ttabs and\nnew lines; [brackets] & <tags> too. " * 40
SMALL = [  # the fixture corpus: 70 short documents, a 300-token vocab, a 1-layer model: seconds per run
    "model.n_layer=1", "model.n_head=2", "model.d_model=16", "model.max_len=32", "tokenizer.vocab_size=300",
    "data=text_files", "data.data_files=tests/fixtures/ckpt_435677f/corpus.jsonl", "trainer.batch_size=4",
    "trainer.eval_batches=2", "trainer.log_every=5", "trainer.precision=fp32", "logger=none",
]


def tokenizer(name: str, vocab: int) -> XLabTokenizer:
    cfg = TokenizerConfig(name=name, vocab_size=vocab, min_frequency=1)
    return XLabTokenizer(TOKENIZERS.get(name)(iter([TEXT] * 3), cfg), cfg.sos_token, cfg.eos_token, cfg.pad_token,
                         cfg.unk_token)


@pytest.mark.parametrize(("name", "vocab"), [("bpe", 300), ("bpe", 700), ("wordpiece", 600), ("unigram", 400)])
def test_byte_table_sums_to_the_texts_utf8_length(name: str, vocab: int):
    tok = tokenizer(name, vocab)
    table = tok.byte_lengths()
    ids = tok.encode(TEXT)
    assert int(table[ids].sum()) == len(TEXT.encode("utf-8"))
    assert table[tok.sos_id] == table[tok.eos_id] == table[tok[tok.pad_token]] == 0  # specials are no text
    assert int(table[[tok.sos_id, *ids, tok.eos_id]].sum()) == len(TEXT.encode("utf-8"))


def test_bits_per_byte_equals_a_hand_computation():
    tok = tokenizer("bpe", 300)
    table = torch.as_tensor(tok.byte_lengths())
    ascii_text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 8
    ids = torch.tensor(tok.encode(ascii_text)[:65])  # ASCII: any cut of the tokens decodes to whole characters
    torch.manual_seed(0)
    model = XLabModel(len(tok), n_layer=1, n_head=2, d_model=16, max_len=64)
    x, y = ids[None, :64], ids[None, 1:65]
    result = evaluate(model, [(x, y)], torch.device("cpu"), byte_lengths=table)
    nll = torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="sum").item()  # nats over 64 targets
    text_bytes = len(tok.decode(y[0]).encode("utf-8"))  # the bytes those targets decode to
    assert result["bytes"] == text_bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-5)
    assert result["loss"] == pytest.approx(nll / 64, rel=1e-5)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bpb_everywhere_and_the_best_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    proc = run_cli("train", *SMALL, "trainer.max_steps=40", "trainer.eval_every=5", "trainer.ckpt_every=100",
                   "trainer.keep_last=1", f"hydra.run.dir={run}")
    records = rows(run)
    train = [r for r in records if "train/loss" in r]
    vals = [r for r in records if "val/loss" in r]
    assert all(r["train/bpb"] > 0 for r in train) and all(r["val/bpb"] > 0 for r in vals)
    best = min(vals, key=lambda r: r["val/loss"])
    ckpts = run / "checkpoints"
    assert (ckpts / "best").resolve().name == f"step_{best['step']:06d}"  # kept by keep_last=1 beside the last
    kept = {"best", "last", f"step_{best['step']:06d}", "step_000040"}
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(kept)
    log = proc.stdout + proc.stderr
    assert f"best: step {best['step']}, val loss {best['val/loss']:.4f}, val bpb {best['val/bpb']:.4f}" in log
    assert "tokenizer bytes per token: train " in log
    assert "epochs over the train split" not in log and "small data (" not in log  # 40 steps: ~0.1 epoch

    out = run_cli("evaluate", f"ckpt={ckpts / 'best'}", "split=val", "max_batches=2", "batch_size=4",
                  "precision=fp32").stdout
    scored = json.loads((ckpts / "best" / "eval_val.json").read_text())
    assert scored["loss"] == pytest.approx(best["val/loss"], rel=1e-6)  # the same windows as training's evaluation
    assert scored["bits_per_byte"] == pytest.approx(best["val/bpb"], rel=1e-6)
    assert scored["bits_per_byte"] == pytest.approx(scored["loss"] * scored["tokens"] / math.log(2) / scored["bytes"])
    assert f"bits per byte {scored['bits_per_byte']:12.4f}" in out

    table = run_cli("results", str(run)).stdout
    assert "| Version | Checkpoint | Loss (test) | Accuracy (test) | Bits per byte (test) |" in table
    same = (ckpts / "best").resolve() == (ckpts / "last").resolve()
    for name in ("best",) if same else ("best", "last"):
        test = json.loads((ckpts / name / "eval_test.json").read_text())
        label = "best = last" if same else name
        assert f"| run | {label} ({(ckpts / name).resolve().name}) | {test['loss']:.4f} | {test['accuracy']:.2f}% | " \
               f"{test['bits_per_byte']:.4f} |" in table
    assert (run / "results.md").read_text() in table


def test_best_tracking_survives_resume(tmp_path: Path):
    common = [*SMALL, "trainer.eval_every=5", "trainer.ckpt_every=10"]
    run_cli("train", *common, "trainer.max_steps=30", f"hydra.run.dir={tmp_path / 'whole'}")
    run_cli("train", *common, "trainer.max_steps=15", f"hydra.run.dir={tmp_path / 'split'}")
    run_cli("train", *common, "trainer.max_steps=30", "resume=auto", f"hydra.run.dir={tmp_path / 'split'}")
    states = [json.loads((tmp_path / n / "checkpoints/last/state.json").read_text()) for n in ("whole", "split")]
    assert states[0]["best"] == states[1]["best"] and states[0]["best"] is not None
    targets = [(tmp_path / n / "checkpoints" / "best").resolve().name for n in ("whole", "split")]
    assert targets[0] == targets[1]


def test_a_run_of_many_epochs_is_warned_and_early_stopping_ends_it(tmp_path: Path):
    """20000 steps of 128 tokens over a ~60k-token train split: warned with the numbers. A learning rate of 1e-30
    leaves the weights as they are: the val loss never improves after the first evaluation, and patience 2 ends
    the run at the third."""
    proc = run_cli("train", *SMALL, "trainer.max_steps=20000", "optimizer.lr=1e-30", "trainer.eval_every=5",
                   "trainer.early_stop_patience=2", f"hydra.run.dir={tmp_path}")
    log = proc.stdout + proc.stderr
    line = next(ln for ln in log.splitlines() if "this run makes" in ln)
    train_tokens = int(line.split(" train tokens)")[0].rsplit("/ ", 1)[1])
    assert f"makes {20000 * 128 / train_tokens:.1f} epochs" in line and "(20000 steps x 128 tokens / " in line
    assert "trainer.early_stop_patience" in line and "checkpoints/best" in line
    assert "early stop at step 15: 2 evaluations without a better val loss than step 5's" in log
    assert max(r["step"] for r in rows(tmp_path)) == 15
    assert json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())["step"] == 15


def test_small_data_regularization_follows_the_epoch_count():
    from omegaconf import OmegaConf

    from xlab.training.config import TrainConfig
    from xlab.training.trainer import regularize_small_data

    cfg = OmegaConf.to_object(OmegaConf.structured(TrainConfig))
    cfg.optimizer.weight_decay = 0.1  # below the floor
    assert regularize_small_data(cfg, epochs=11.5) == [] and cfg.model.dropout == 0.0
    assert regularize_small_data(cfg, epochs=13.0) == ["model.dropout=0.1", "optimizer.weight_decay=2.0"]
    assert (cfg.model.dropout, cfg.optimizer.weight_decay) == (0.1, 2.0)
    assert regularize_small_data(cfg, epochs=21.0) == ["model.dropout=0.2"]  # the second tier: more dropout
    cfg = OmegaConf.to_object(OmegaConf.structured(TrainConfig))
    assert regularize_small_data(cfg, epochs=21.0) == ["model.dropout=0.2", "optimizer.weight_decay=2.0"]
    cfg = OmegaConf.to_object(OmegaConf.structured(TrainConfig))
    cfg.model.dropout, cfg.optimizer.weight_decay = 0.3, 3.0  # higher configured values are kept
    assert regularize_small_data(cfg, epochs=21.0) == []
    assert (cfg.model.dropout, cfg.optimizer.weight_decay) == (0.3, 3.0)
    cfg = OmegaConf.to_object(OmegaConf.structured(TrainConfig))
    cfg.trainer.small_data_regularization, cfg.optimizer.weight_decay = False, 0.1
    assert regularize_small_data(cfg, epochs=30.0) == [] and cfg.optimizer.weight_decay == 0.1


def test_small_data_regularization_is_logged_and_saved(tmp_path: Path):
    proc = run_cli("train", *SMALL, "trainer.max_steps=8000", "trainer.max_time_s=2", f"hydra.run.dir={tmp_path}")
    log = proc.stdout + proc.stderr
    assert "small data (" in log and "training with model.dropout=0.1 optimizer.weight_decay=2.0 (" in log
    config = (tmp_path / "checkpoints" / "last" / "config.yaml").read_text()
    assert "dropout: 0.1" in config and "weight_decay: 2.0" in config and "small_data_regularization: true" in config
    # max_time_s: the 8000-step run stopped after ~2 s, evaluated and saved, and can continue with resume=auto
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert 0 < state["step"] < 8000 and f"stopped at step {state['step']} of 8000" in log
