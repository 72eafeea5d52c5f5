"""Config composition, registries and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.errors import XLabError
from xlab.registry import Registry
from xlab.training.config import TrainConfig

register_schema("train", TrainConfig)


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_experiment_quick_is_the_default():
    assert composed("experiment=quick") == composed()


def test_every_experiment_composes():
    for path in sorted(Path(CONFIG_DIR, "experiment").glob("*.yaml")):
        assert path.read_text().startswith("# @package _global_")
        assert composed(f"experiment={path.stem}")["model"]["n_layer"] >= 1


def test_config_keys_the_docs_rely_on():
    cfg = composed()
    for group, keys in {
        "trainer": ["max_steps", "batch_size", "grad_accum_steps", "precision", "eval_every", "eval_batches",
                    "ckpt_every", "log_every"],
        "model": ["n_layer", "n_head", "d_model", "max_len"],
        "tokenizer": ["vocab_size"],
        "paths": ["cache_dir"],
    }.items():
        assert set(keys) <= set(cfg[group]), group
    assert "seed" in cfg and "resume" in cfg


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XLAB_CACHE_DIR", str(tmp_path))
    assert composed()["paths"]["cache_dir"] == str(tmp_path)


def test_registry_unknown_name_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.register("b")(1)
    reg.register("a")(2)
    assert reg.get("a") == 2 and reg.names() == ["a", "b"]
    with pytest.raises(XLabError, match="unknown widget 'c'; valid: a, b"):
        reg.get("c")
    with pytest.raises(ValueError):
        reg.register("a")(3)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=gtp"], "Could not find 'model/gtp'; valid: gpt"),
        (["model.n_layr=3"], "Key 'n_layr' not in 'ModelConfig'"),
        (["trainer.max_steps=many"], "could not be converted to Integer"),
        (["trainer.precision=fp8"], "expected one of [auto, fp32, bf16, fp16]"),
        (["model.norm=batchnorm"], "unknown norm 'batchnorm'; valid: layernorm"),
        (["optimizer.name=adamx"], "unknown optimizer 'adamx'; valid: adamw"),
        (["model.n_head=3"], "model.n_head=3 must divide model.d_model=128"),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
        (["trainer.strategy=zero3"], "trainer.strategy=zero3 Invalid value 'zero3', expected one of [ddp, fsdp]"),
    ],
)
def test_bad_input_is_one_line(args, expected, tmp_path):
    proc = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    for module, extra in (("evaluate", []), ("generate", ["prompt=x"]), ("export", [])):
        proc = run_cli(module, f"ckpt={tmp_path / 'nope'}", *extra, check=False)
        assert proc.returncode != 0
        assert proc.stderr.strip() == f"error: checkpoint path '{tmp_path / 'nope'}' does not exist"
