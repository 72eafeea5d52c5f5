"""Two CPU processes under torchrun (gloo): same data and curve as one process with the same global batch, one run
dir, identical weights across ranks, and a checkpoint that resumes and evaluates in a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_cli

COMMON = [*TINY, "trainer.precision=fp32", "trainer.log_every=2", "trainer.eval_every=3", "trainer.ckpt_every=3",
          "trainer.eval_batches=2", "scheduler=constant", "scheduler.warmup_steps=2"]  # lr independent of max_steps


def records(run: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("torchrun")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlab.train", *COMMON,
         "trainer.batch_size=4", "trainer.max_steps=6"],
        cwd=cwd, capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) on cpu; global batch 8 sequences" in proc.stdout + proc.stderr
    runs = list(cwd.glob("outputs/*/*"))
    assert len(runs) == 1, runs  # both ranks resolved the same default run dir
    return runs[0]


def test_two_processes_follow_the_one_process_curve(two_process_run: Path, tmp_path: Path):
    single = tmp_path / "single"
    run_cli("train", *COMMON, "trainer.batch_size=8", "trainer.max_steps=6", f"hydra.run.dir={single}")
    for key in ("train/loss", "val/loss"):
        ours, ref = records(two_process_run, key), records(single, key)
        assert [r["step"] for r in ours] == [r["step"] for r in ref]
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], abs=1e-4)
    assert [r["tokens"] for r in records(two_process_run, "train/loss")] == [1024, 2048, 3072]


def test_one_metrics_file_identical_weights_on_both_ranks(two_process_run: Path):
    assert sorted(p.name for p in two_process_run.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    lines = (two_process_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 5  # 3 train + 2 eval lines, written once (rank 0)
    state = json.loads((two_process_run / "checkpoints" / "last" / "state.json").read_text())
    sums = state["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    ckpt = two_process_run / "checkpoints" / "last"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}


def test_two_process_checkpoint_resumes_and_evaluates_in_one_process(two_process_run: Path, tmp_path: Path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    ckpt = two_process_run / "checkpoints" / "last"
    run_cli("train", *COMMON, "trainer.batch_size=8", "trainer.max_steps=8", f"resume={ckpt}",
            f"hydra.run.dir={resumed}")
    run_cli("train", *COMMON, "trainer.batch_size=8", "trainer.max_steps=8", f"hydra.run.dir={straight}")
    assert records(resumed, "val/loss")[-1]["val/loss"] == pytest.approx(records(straight, "val/loss")[-1]["val/loss"],
                                                                         abs=1e-4)
    out = run_cli("evaluate", f"ckpt={resumed / 'checkpoints' / 'last'}", "max_batches=2").stdout
    assert "loss" in out and json.loads((resumed / "checkpoints" / "last" / "eval_val.json").read_text())["tokens"]


def test_two_process_checkpoint_resumes_in_two_processes(two_process_run: Path, tmp_path: Path):
    straight = tmp_path / "straight"
    run_cli("train", *COMMON, "trainer.batch_size=8", "trainer.max_steps=8", f"hydra.run.dir={straight}")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "xlab.train", *COMMON,
         "trainer.batch_size=4", "trainer.max_steps=8", f"resume={two_process_run / 'checkpoints' / 'last'}",
         f"hydra.run.dir={tmp_path / 'resumed'}"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert records(tmp_path / "resumed", "val/loss")[-1]["val/loss"] == pytest.approx(
        records(straight, "val/loss")[-1]["val/loss"], abs=1e-4)
