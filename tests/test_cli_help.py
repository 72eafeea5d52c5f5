"""`--help` of each command lists that command's own options, not the training groups that share configs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Group names as Hydra lists them ("optimizer: adamw, muon, sgd"); the words alone may appear in usage text.
TRAINING_GROUPS = ("optimizer", "scheduler", "hparams_search", "tokenizer", "trainer", "accelerate", "experiment",
                   "model", "data", "logger")


def run_help(command: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"xlab.{command}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("command", "flag", "own"), [
    ("generate", "--help", ["usage:", "ckpt: ???", "max_new_tokens: 50", "prompts_file: null", "num_samples: 1",
                            "sampler: beam, greedy, multinomial, top_k, top_p", "top_p"]),
    ("generate", "-h", ["max_new_tokens: 50", "sampler: beam, greedy, multinomial, top_k, top_p"]),
    ("evaluate", "--help", ["usage:", "ckpt=PATH split=val|test", "split: val", "max_batches: null"]),
    ("export", "--help", ["usage:", "format: xlab", "out: null"]),
    ("serve", "--help", ["usage:", "python -m xlab.serve ckpt=PATH", "host: 127.0.0.1", "port: 8000",
                         "allow_remote: false"]),
])
def test_command_help_lists_only_its_own_options(command: str, flag: str, own: list[str]):
    proc = run_help(command, flag)
    assert proc.returncode == 0, proc.stderr
    for text in own:
        assert text in proc.stdout, f"{text!r} missing from {command} {flag}:\n{proc.stdout}"
    for group in TRAINING_GROUPS:
        listed = re.search(rf"^\s*{group}:", proc.stdout, re.MULTILINE)
        assert not listed, f"training group {group!r} in {command} {flag}:\n{proc.stdout}"


def test_help_shows_the_overridden_group_and_writes_nothing(tmp_path: Path):
    proc = run_help("generate", "sampler=beam", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(now: beam)" in proc.stdout and "name: beam" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_train_help_is_hydras_with_every_group():
    proc = run_help("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "train is powered by Hydra" in proc.stdout
    for group in ("optimizer", "scheduler", "data", "model", "sampler"):
        assert f"\n{group}: " in proc.stdout
