"""Exact resume after SIGKILL and SIGTERM, crash-safe saves, refused unsafe files, determinism, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli
from safetensors.torch import load_file

RUN = [*TINY, "trainer.precision=fp32", "trainer.max_steps=40", "trainer.ckpt_every=10", "trainer.log_every=5",
       "trainer.eval_every=20", "trainer.eval_batches=1", "model.dropout=0.1"]  # dropout: RNG state must resume too


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xlab.train", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def train_lines(run: Path) -> dict[int, dict]:
    """The last train line per step (a resumed run repeats the steps after its checkpoint), without timings."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = {k: v for k, v in r.items() if not k.startswith("tok_per_s")}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    run = tmp_path_factory.mktemp("straight")
    run_cli("train", *RUN, f"hydra.run.dir={run}")
    return run


def test_sigkill_then_resume_auto_is_bitwise_identical(reference, tmp_path_factory):
    run = tmp_path_factory.mktemp("killed")
    proc = start(run)
    wait_for(run / "checkpoints" / "last", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(train_lines(run), default=0)
    assert (run / "checkpoints" / "last").resolve().name == "step_000010" and killed_at < 40
    run_cli("train", *RUN, "resume=auto", f"hydra.run.dir={run}")
    a, b = weights(reference), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_lines(run) == train_lines(reference)


def test_sigterm_checkpoints_exits_cleanly_and_resumes_to_the_same_weights(reference, tmp_path_factory):
    run = tmp_path_factory.mktemp("preempted")
    proc = start(run)
    wait_for(run / "checkpoints" / "last", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "Continue with resume=auto" in out
    stopped = json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"]
    assert 10 <= stopped < 40
    run_cli("train", *RUN, "resume=auto", f"hydra.run.dir={run}")
    a, b = weights(reference), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_a_save_leaves_last_on_a_complete_checkpoint(tmp_path: Path):
    proc = start(tmp_path, env={"XLAB_TEST_SAVE_PAUSE": "20:60"})
    for line in proc.stdout:  # wait until the second save is half written
        if "pausing inside the save" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / ".tmp_step_000020").is_dir() and not (ckpts / "step_000020").exists()
    last = (ckpts / "last").resolve()
    assert last.name == "step_000010"
    assert {"model.safetensors", "optimizer.bin", "config.yaml", "tokenizer.json", "state.json"} <= \
        {p.name for p in last.iterdir()}
    run_cli("train", *RUN, "resume=auto", f"hydra.run.dir={tmp_path}")
    assert json.loads((ckpts / "last" / "state.json").read_text())["step"] == 40


def test_same_seed_same_metrics(tmp_path: Path):
    short = [*TINY, "trainer.precision=fp32", "trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_every=3",
             "trainer.eval_batches=1", "model.dropout=0.1"]
    for name in ("a", "b"):
        run_cli("train", *short, f"hydra.run.dir={tmp_path / name}")
    assert train_lines(tmp_path / "a") == train_lines(tmp_path / "b")
    evals = [[line for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if "val/" in line]
             for n in ("a", "b")]
    assert evals[0] == evals[1]


def test_resume_with_another_model_is_refused_naming_the_keys(tmp_path: Path):
    short = [*TINY, "trainer.max_steps=2", "trainer.eval_batches=1"]
    run_cli("train", *short, f"hydra.run.dir={tmp_path}")
    before = (tmp_path / "metrics.jsonl").read_text()
    proc = run_cli("train", *short, "model.n_layer=3", "trainer.max_steps=4", "resume=auto",
                   f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "model.n_layer (checkpoint 2, now 3)" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing written
    ok = run_cli("train", *short, "trainer.max_steps=4", "trainer.eval_every=1", "resume=auto",
                 f"hydra.run.dir={tmp_path}")  # training settings may change
    assert "resumed from" in ok.stdout + ok.stderr


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['XLAB_PWNED']}",))


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    run_cli("train", *TINY, "trainer.max_steps=2", "trainer.eval_batches=1", f"hydra.run.dir={run}")
    marker = tmp_path / "pwned"
    os.environ["XLAB_PWNED"] = str(marker)
    try:
        torch.save({"state": Payload()}, run / "checkpoints" / "last" / "optimizer.bin")
    finally:
        del os.environ["XLAB_PWNED"]
    proc = run_cli("train", *TINY, "trainer.max_steps=4", "trainer.eval_batches=1", "resume=auto",
                   f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "refusing to load" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists(), "the pickled code ran"


def test_keep_last_retention(tmp_path: Path):
    run_cli("train", *TINY, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.keep_last=2",
            "trainer.eval_batches=1", "trainer.save_best=false", f"hydra.run.dir={tmp_path}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last", "step_000006", "step_000008"]
