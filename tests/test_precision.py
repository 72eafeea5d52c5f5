"""One `precision=auto` rule (xlab.device.auto_precision): train, evaluate, generate and serve choose the same dtype
on the same device, each through its own code path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xlab import device as xdevice
from xlab.evaluation.windows import score_checkpoint
from xlab.schema import Precision


def chosen_by_each_command(ckpt: Path, run_dir: Path) -> dict[str, str]:
    from xlab.generate import GenerateConfig, load
    from xlab.serve.__main__ import ServeConfig, checked, load_models
    from xlab.training.config import TrainConfig
    from xlab.training.trainer import Trainer

    cfg = TrainConfig()  # the default run, shrunk: construction only, no step is taken
    cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.max_len = 1, 32, 2, 32
    cfg.tokenizer.vocab_size, cfg.data.max_documents, cfg.logger.trackers = 512, 60, []
    trainer = Trainer(cfg, run_dir)
    generated = load(GenerateConfig(ckpt=str(ckpt), device="cpu"), str(ckpt))
    serve_cfg = ServeConfig(ckpt=str(ckpt), device="cpu")
    served = next(iter(load_models(serve_cfg, checked(serve_cfg)).values()))
    return {
        "train": str(trainer.precision),
        "train (Accelerate)": trainer.accelerator.mixed_precision.replace("no", "fp32"),
        "evaluate": score_checkpoint(ckpt, "val", max_batches=1, device="cpu")["precision"],
        "generate": {torch.float32: "fp32", torch.bfloat16: "bf16"}[generated.model.tok_emb.weight.dtype],
        "serve": {torch.float32: "fp32", torch.bfloat16: "bf16"}[served.model.tok_emb.weight.dtype],
    }


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["cpu with fast bf16", "cpu without"])
def test_train_evaluate_generate_and_serve_choose_the_same_dtype(fast_bf16: bool, tiny_run: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(xdevice, "cpu_has_fast_bf16", lambda: fast_bf16)
    expected = "bf16" if fast_bf16 else "fp32"
    chosen = chosen_by_each_command((tiny_run / "checkpoints" / "last").resolve(), tmp_path / "run")
    assert chosen == dict.fromkeys(chosen, expected)


def test_the_rule():
    cpu = torch.device("cpu")
    assert xdevice.resolve_precision("fp32", cpu) is Precision.fp32  # an explicit value is kept
    assert xdevice.resolve_precision("auto", cpu) is (Precision.bf16 if xdevice.cpu_has_fast_bf16() else
                                                      Precision.fp32)
    assert xdevice.accelerate_precision(Precision.fp32) == "no"
