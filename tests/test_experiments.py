"""Every configs/experiment/*.yaml composes and trains a few steps (shrunk to a tiny model and batch on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.data.synthetic import write_wikipedia_parquet
from xlab.training.config import TrainConfig

register_schema("train", TrainConfig)
EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
SHRINK = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.max_len=32", "tokenizer.vocab_size=512",
          "trainer.batch_size=2", "trainer.grad_accum_steps=2", "trainer.max_steps=3", "trainer.eval_batches=1",
          "trainer.eval_every=3", "trainer.ckpt_every=3", "logger=none", "scheduler.warmup_steps=1"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_a_few_steps(name: str, tmp_path: Path):
    from xlab.training.trainer import train

    overrides = [f"experiment={name}", *SHRINK]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        data_name = compose(config_name="train", overrides=[f"experiment={name}"]).data.name
    if data_name == "wikipedia":  # no hub here: the same loader reads local parquet shards with Wikipedia's schema
        write_wikipedia_parquet(tmp_path / "wiki", articles=120, shards=2)
        overrides.append(f"data.data_files={tmp_path / 'wiki'}/*.parquet")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    val = train(cfg, tmp_path / "run")
    assert val["loss"] > 0 and (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()
