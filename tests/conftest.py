"""Shared fixtures: offline env, one token cache per test session, and one tiny trained run for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.max_len=64",
    "trainer.batch_size=8", "logger=none",
]


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("xlab_cache")
    os.environ.update(
        XLAB_CACHE_DIR=str(cache), WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets")), TOKENIZERS_PARALLELISM="false",
    )
    return cache


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs do not leak settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_cli(module: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"xlab.{module}", *args], cwd=cwd or REPO, capture_output=True, text=True,
        env=os.environ.copy(), timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"xlab.{module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, offline_env: Path) -> Path:
    """A tiny model trained for 30 steps through the real CLI; returns its run dir."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_cli(
        "train", *TINY, "trainer.max_steps=30", "trainer.eval_every=10", "trainer.ckpt_every=20",
        "trainer.log_every=5", "trainer.eval_batches=4", "scheduler.warmup_steps=5", "logger=tensorboard",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir
