"""Exact resume after SIGKILL and SIGTERM, crash-safe saves, refused unsafe files, determinism, retention; and the
run dir's contract: one writer at a time, no fresh run over another, the double-signal stop, metrics without
repeats."""

from __future__ import annotations

import json
import os
import shutil
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


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_until(proc: subprocess.Popen, text: str) -> str:
    """The output up to and including the first line that holds `text` (the process must still be running)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never appeared (exit {proc.wait()}):\n{''.join(seen)}")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "last" / "model.safetensors")


def without_timings(run: Path) -> list[dict]:
    """Every line of metrics.jsonl, in order, without the keys that measure time."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("tok_per_s", "mfu"))}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_lines(run: Path) -> dict[int, dict]:
    """The train line of each step, without timings."""
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


def test_kill_during_a_save_leaves_last_on_a_complete_checkpoint_and_resume_rewrites_no_metrics(reference,
                                                                                               tmp_path: Path):
    """Killed in the save of step 20: the lines of steps 15 and 20 are in metrics.jsonl, the checkpoint is step 10's.
    The resumed run drops them and writes them again: the file equals the uninterrupted run's (the old loop kept
    both copies)."""
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
    assert max(r["step"] for r in without_timings(tmp_path)) == 20
    run_cli("train", *RUN, "resume=auto", f"hydra.run.dir={tmp_path}")
    assert json.loads((ckpts / "last" / "state.json").read_text())["step"] == 40
    assert without_timings(tmp_path) == without_timings(reference)


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


# --- the run dir: no fresh run over another, a dangling `last`, one writer at a time ----------------------------


def test_a_fresh_run_into_a_run_dir_with_checkpoints_is_refused(tmp_path: Path):
    short = [*TINY, "trainer.max_steps=2", "trainer.eval_batches=1", f"hydra.run.dir={tmp_path}"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "train/loss": 1.0}\n')  # a run killed before its first save
    run_cli("train", *short)  # no checkpoints: a fresh run may start, and the old lines go
    assert [r["step"] for r in without_timings(tmp_path)] == [2, 2]  # its train and val lines
    before = snapshot(tmp_path)
    proc = run_cli("train", *short, "seed=1", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds the checkpoints of another run" in proc.stderr
    assert all(key in proc.stderr for key in ("resume=auto", "hydra.run.dir", "overwrite=true"))
    assert snapshot(tmp_path) == before  # refused before Hydra wrote anything
    run_cli("train", *short, "trainer.max_steps=1", "overwrite=true")  # replaces the old run
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "last", "step_000001"]
    assert [r["step"] for r in without_timings(tmp_path)] == [1, 1]


def test_resume_auto_with_a_dangling_last_takes_the_newest_complete_checkpoint_or_refuses(tmp_path: Path):
    common = [*TINY, "trainer.eval_batches=1", "trainer.ckpt_every=2", f"hydra.run.dir={tmp_path}"]
    run_cli("train", *common, "trainer.max_steps=4")
    ckpts = tmp_path / "checkpoints"
    (ckpts / "last").unlink()
    (ckpts / "last").symlink_to("step_000099")
    older = snapshot(ckpts / "step_000002")
    proc = run_cli("train", *common, "trainer.max_steps=6", "resume=auto")
    log = proc.stdout + proc.stderr
    assert "resuming from the newest complete one" in log and f"resumed from {ckpts / 'step_000004'} at step 4" in log
    assert json.loads((ckpts / "last" / "state.json").read_text())["step"] == 6
    assert snapshot(ckpts / "step_000002") == older  # not overwritten by a run restarted at step 0
    for step in ckpts.glob("step_*"):  # nothing complete left: refused, rather than a restart over the run
        shutil.rmtree(step)
    (ckpts / "last").unlink()
    (ckpts / "last").symlink_to("step_000099")
    before = snapshot(tmp_path)
    proc = run_cli("train", *common, "trainer.max_steps=6", "resume=auto", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no complete checkpoint to continue from" in proc.stderr and "step_000099" in proc.stderr
    assert snapshot(tmp_path) == before


def test_an_empty_val_split_is_refused_before_training(tmp_path: Path):
    """Three documents all land in the train split (its 90% rounds up to all three)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"{i}.txt").write_text(f"Document {i} says a few plain words about trees and rivers. " * 40)
    run = tmp_path / "run"
    proc = run_cli("train", *TINY, "data=text_files", f"data.data_files={docs}/*.txt", "data.max_documents=3",
                   "tokenizer.vocab_size=300", "trainer.max_steps=2", f"hydra.run.dir={run}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # no step was trained
    assert "the val split has 0 tokens" in errors[0] and "data.split_fractions" in errors[0]


def test_a_second_writer_is_refused_while_a_run_holds_the_run_dir(tmp_path: Path):
    """What an overlapping SLURM requeue does: the same command, resume=auto, while the first run is in a save (the
    old loop let it start, and its first save deleted the other run's temporary checkpoint)."""
    short = [*TINY, "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_batches=1", "resume=auto",
             f"hydra.run.dir={tmp_path}"]
    first = subprocess.Popen([sys.executable, "-m", "xlab.train", *short], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "XLAB_TEST_SAVE_PAUSE": "2:120"})
    try:
        read_until(first, "pausing inside the save")
        second = run_cli("train", *short, check=False)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is in use by another run (pid {first.pid} on " in second.stderr
        assert (tmp_path / "checkpoints" / ".tmp_step_000002" / "model.safetensors").is_file()  # left alone
    finally:
        first.kill()
        first.wait()
    run_cli("train", *short)  # the OS released the killed run's lock: the requeued run goes ahead
    assert json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())["step"] == 4


# --- the double-signal contract ------------------------------------------------------------------------------

SIGNALLED = [*TINY, "trainer.precision=fp32", "trainer.max_steps=40", "trainer.ckpt_every=4", "trainer.log_every=2",
             "trainer.eval_every=4", "trainer.eval_batches=1"]


def signalled(run_dir: Path, pause: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xlab.train", *SIGNALLED, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLAB_TEST_SAVE_PAUSE": pause})


def last_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["step"]


def test_a_second_sigterm_during_the_stop_checkpoint_finishes_it(tmp_path: Path):
    """The first SIGTERM arrives in the save of step 8, so the run stops at step 9; the second one arrives in that
    stop checkpoint's save (the old loop died there, losing it)."""
    proc = signalled(tmp_path, "8,9:6")
    read_until(proc, "pausing inside the save")
    proc.send_signal(signal.SIGTERM)
    read_until(proc, "received SIGTERM: stopping")
    read_until(proc, "pausing inside the save")
    proc.send_signal(signal.SIGTERM)
    out = read_until(proc, "received SIGTERM again")
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert last_step(tmp_path) == 9 and "stopped at step 9 of 40" in out


@pytest.mark.parametrize("signals", [2, 3])
def test_signals_during_an_in_loop_save(signals: int, tmp_path: Path):
    """Two signals in the save of step 8: it is finished and the run exits, with no further step (the old loop
    raised KeyboardInterrupt out of the save, with a traceback). A third kills the run at once; `last` stays on the
    checkpoint before."""
    proc = signalled(tmp_path, "8:6" if signals == 2 else "8:120")
    read_until(proc, "pausing inside the save")
    proc.send_signal(signal.SIGTERM)
    read_until(proc, "received SIGTERM: stopping")
    proc.send_signal(signal.SIGTERM)
    out = read_until(proc, "received SIGTERM again")
    if signals == 3:
        proc.send_signal(signal.SIGTERM)
    out += proc.communicate(timeout=120)[0]
    assert "Traceback" not in out, out
    if signals == 2:
        assert proc.returncode == 0 and last_step(tmp_path) == 8 and "stopped at step 8 of 40" in out, out
        assert max(r["step"] for r in without_timings(tmp_path)) == 8  # no step after the save, no evaluation
    else:
        assert proc.returncode == -signal.SIGTERM, out
        assert last_step(tmp_path) == 4 and (tmp_path / "checkpoints" / ".tmp_step_000008").is_dir()
