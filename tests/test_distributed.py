"""Two CPU processes under torchrun (gloo), DDP and FSDP: same data and curve as one process with the same global
batch, one run dir, identical weights across DDP ranks, FSDP's curve equal to DDP's with a fraction of the memory,
and checkpoints that resume (bitwise, after a SIGKILL), change world size and load in every command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port, launch_nodes, run_cli
from safetensors.torch import load_file

STEPS = 24
COMMON = [*TINY, "trainer.precision=fp32", "trainer.log_every=2", "trainer.eval_every=8", "trainer.ckpt_every=8",
          "trainer.eval_batches=2", "scheduler=constant", "scheduler.warmup_steps=2",  # lr independent of max_steps
          f"trainer.max_steps={STEPS}",
          # in-loop downstream tasks: dealt across ranks, so their accuracy must not depend on the world size
          "trainer.eval_tasks=[xlab_continuation,xlab_cloze]", "trainer.eval_tasks_limit=25"]
TASK_KEYS = ("tasks/xlab_continuation/acc", "tasks/xlab_continuation/acc_norm", "tasks/xlab_cloze/acc")
TWO_RANKS = [*COMMON, "trainer.batch_size=4"]  # the global batch of one process with batch_size=8
FSDP = [*TWO_RANKS, "trainer.strategy=fsdp"]
# --standalone: a free rendezvous port, so that launches of concurrent test workers do not meet
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "xlab.train"]


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records(run: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def wait_for_lock(run: Path, timeout: float = 30) -> None:
    from xlab.fsio import try_lock

    deadline = time.monotonic() + timeout
    while (f := try_lock(run / ".lock")) is None:
        assert time.monotonic() < deadline, f"{run} stays locked"
        time.sleep(0.1)
    f.close()


def memory(log: str) -> dict[str, float]:
    m = re.search(r"memory per rank \(\w+, 2 rank\(s\)\): parameters ([\d.]+) MB, gradients ([\d.]+) MB, "
                  r"optimizer state ([\d.]+) MB", log)
    assert m, log
    return dict(zip(("parameters", "gradients", "optimizer_state"), map(float, m.groups())))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("torchrun")
    proc = torchrun(*TWO_RANKS, cwd=cwd)
    assert "2 process(es) on cpu; global batch 8 sequences" in proc.stdout + proc.stderr
    runs = list(cwd.glob("outputs/*/*"))
    assert len(runs) == 1, runs  # both ranks resolved the same default run dir
    return runs[0], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(*FSDP, f"hydra.run.dir={run}")
    return run, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("single")
    run_cli("train", *COMMON, "trainer.batch_size=8", f"hydra.run.dir={run}")
    return run


def test_two_processes_follow_the_one_process_curve(ddp_run, single_run: Path):
    for key in ("train/loss", "val/loss"):
        ours, ref = records(ddp_run[0], key), records(single_run, key)
        assert [r["step"] for r in ours] == [r["step"] for r in ref]
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], abs=1e-4)
    assert [r["tokens"] for r in records(ddp_run[0], "train/loss")][:3] == [1024, 2048, 3072]


def test_in_loop_task_accuracy_is_the_same_on_one_and_two_ranks(ddp_run, fsdp_run, single_run: Path):
    """25 items (odd: the ranks' shares differ, and FSDP's collective forwards must still pair up); every
    evaluation's accuracies under DDP and FSDP equal one process's."""
    def tasks(run: Path) -> list[dict]:
        return [{k: r[k] for k in TASK_KEYS} for r in records(run, "val/loss")]

    ref = tasks(single_run)
    assert len(ref) == STEPS // 8 and all(0 <= v <= 1 for r in ref for v in r.values())
    assert tasks(ddp_run[0]) == ref
    assert tasks(fsdp_run[0]) == ref


def test_in_loop_task_accuracy_equals_lm_evals_on_the_last_checkpoint(single_run: Path):
    """What training logged at its last evaluation is what lm-eval's task machinery scores on the checkpoint."""
    pytest.importorskip("lm_eval")
    from xlab.evaluation.harness import score_tasks

    results, _ = score_tasks(single_run / "checkpoints" / "last", ["xlab_continuation", "xlab_cloze"], limit=25)
    final = records(single_run, "val/loss")[-1]
    for key in TASK_KEYS:
        _, task, metric = key.split("/")
        assert final[key] == results["results"][task][f"{metric},none"], key


def test_one_metrics_file_identical_weights_on_both_ranks(ddp_run):
    run = ddp_run[0]
    assert sorted(p.name for p in run.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == STEPS // 2 + STEPS // 8  # train + eval lines, written once (rank 0)
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    sums = state["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1] == state["weight_checksum"]
    ckpt = run / "checkpoints" / "last"
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin"} <= {p.name for p in ckpt.iterdir()}


def test_two_process_checkpoint_resumes_and_evaluates_in_one_process(ddp_run, single_run: Path, tmp_path: Path):
    resumed = tmp_path / "resumed"
    run_cli("train", *COMMON, "trainer.batch_size=8", f"resume={ddp_run[0] / 'checkpoints' / 'step_000016'}",
            f"hydra.run.dir={resumed}")
    final = records(single_run, "val/loss")[-1]["val/loss"]
    assert records(resumed, "val/loss")[-1]["val/loss"] == pytest.approx(final, abs=1e-4)
    out = run_cli("evaluate", f"ckpt={resumed / 'checkpoints' / 'last'}", "max_batches=2").stdout
    assert "loss" in out and json.loads((resumed / "checkpoints" / "last" / "eval_val.json").read_text())["tokens"]


def test_two_process_checkpoint_resumes_in_two_processes(ddp_run, single_run: Path, tmp_path: Path):
    torchrun(*TWO_RANKS, f"resume={ddp_run[0] / 'checkpoints' / 'step_000016'}", f"hydra.run.dir={tmp_path}")
    assert records(tmp_path, "val/loss")[-1]["val/loss"] == pytest.approx(
        records(single_run, "val/loss")[-1]["val/loss"], abs=1e-5)


def test_fsdp_follows_ddp_in_half_the_memory(fsdp_run, ddp_run):
    """fp32, same global batch: FSDP's curve is DDP's; each rank holds half of the parameters, gradients and
    optimizer state; the checksum of the shards is the checksum of the consolidated weights."""
    for key in ("train/loss", "val/loss"):
        ours, ref = records(fsdp_run[0], key), records(ddp_run[0], key)
        assert [r["step"] for r in ours] == [r["step"] for r in ref] and len(ours) >= 3
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], abs=1e-5)
    sharded, full = memory(fsdp_run[1]), memory(ddp_run[1])
    params = sum(t.numel() * t.element_size() for t in weights(ddp_run[0]).values()) / 2**20
    assert full["parameters"] == full["gradients"] == pytest.approx(params, abs=1e-3)  # the whole model, fp32
    assert full["optimizer_state"] == pytest.approx(2 * params, abs=2e-3)  # AdamW: two moments
    for kind in full:
        assert sharded[kind] == pytest.approx(full[kind] / 2, rel=0.05)  # ~1/N: uneven rows pad a shard
    state = json.loads((fsdp_run[0] / "checkpoints" / "last" / "state.json").read_text())
    shards = state["rank_weight_checksums"]
    assert len(shards) == 2 and shards[0] != shards[1]
    consolidated = sum(t.double().sum().item() for t in weights(fsdp_run[0]).values())
    assert state["weight_checksum"] == pytest.approx(consolidated, rel=1e-9)
    assert sorted(weights(fsdp_run[0])) == sorted(weights(ddp_run[0]))  # one layout for both strategies


# DDP's kill and freeze end the same way (the freeze after the timeout): one DDP case, the frozen one, suffices
@pytest.mark.parametrize(("strategy", "sig"), [("fsdp", "SIGKILL"), ("ddp", "SIGSTOP")])
def test_a_lost_rank_ends_the_run_in_one_line_and_resume_is_bitwise(strategy, sig, ddp_run, fsdp_run, tmp_path):
    """Rank 1 killed (or frozen: SIGSTOP) while both ranks are in the save of step 16: rank 0 exits non-zero within
    seconds (a frozen rank: after trainer.collective_timeout_s), naming the lost rank and how to continue; `last`
    stays on step 8, and resume=auto reproduces the uninterrupted run's weights bit for bit."""
    args = [*TWO_RANKS, f"trainer.strategy={strategy}", "trainer.collective_timeout_s=5", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([*TORCHRUN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLAB_TEST_SAVE_PAUSE": "16:3"}, start_new_session=True)
    pid, error, lost_at = None, None, None
    try:
        for line in proc.stdout:
            if pid is None and (m := re.search(r"pausing inside the save .*\(rank 1, pid (\d+)\)", line)):
                pid, lost_at = int(m.group(1)), time.monotonic()
                os.kill(pid, getattr(signal, sig))
            elif line.startswith("error: "):
                error, waited = line.strip(), time.monotonic() - lost_at
                break
    finally:
        if pid is not None and sig == "SIGSTOP":
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    assert error is not None and proc.returncode != 0
    assert waited < 30  # bounded: the collective's timeout (5 s here; 600 by default), not torch's 30 minutes
    assert "rank 0 of 2 lost rank 1" in error and "checkpoints/last is step_000008" in error
    assert f"continue with resume=auto hydra.run.dir={tmp_path}" in error
    wait_for_lock(tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "last").resolve().name == "step_000008" and not (ckpts / "step_000016").exists()
    torchrun(*args[:-2], "resume=auto", f"hydra.run.dir={tmp_path}")
    a, b = weights((fsdp_run if strategy == "fsdp" else ddp_run)[0]), weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_checkpoint_resumes_on_one_rank_and_loads_everywhere(fsdp_run, tmp_path: Path):
    """Another world size (DCP reshards), evaluate / generate / export, and transformers on the export."""
    run = fsdp_run[0]
    run_cli("train", *COMMON, "trainer.batch_size=8", "trainer.strategy=fsdp",
            f"resume={run / 'checkpoints' / 'step_000016'}", f"hydra.run.dir={tmp_path / 'one'}")
    assert records(tmp_path / "one", "val/loss")[-1]["val/loss"] == pytest.approx(
        records(run, "val/loss")[-1]["val/loss"], abs=1e-4)
    ckpt = run / "checkpoints" / "best"
    assert "bits per byte" in run_cli("evaluate", f"ckpt={ckpt}", "max_batches=2").stdout
    assert run_cli("generate", f"ckpt={ckpt}", "prompt=The", "max_new_tokens=4").stdout.strip()
    run_cli("export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", "format=hf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_checkpoint_resumes_only_under_its_strategy(fsdp_run, ddp_run, tmp_path: Path):
    for ckpt, strategy, saved in ((fsdp_run[0], "ddp", "an FSDP run"), (ddp_run[0], "fsdp", "a DDP run")):
        proc = run_cli("train", *COMMON, f"trainer.strategy={strategy}", f"resume={ckpt / 'checkpoints' / 'last'}",
                       f"hydra.run.dir={tmp_path / strategy}", check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"saved by {saved}" in errors[0] and f"trainer.strategy={strategy}" in errors[0]
        assert not (tmp_path / strategy / "checkpoints").exists()


def test_two_nodes_on_one_machine_are_one_run_and_resume(ddp_run, tmp_path: Path):
    """Two torchrun launches as node 0 and node 1 (c10d rendezvous on 127.0.0.1, one rank each): one run dir, one
    metrics file, one checkpoint writer; 16 steps, then resume=auto to 24: the curve of one 2-process launch."""
    def nodes(*args: str) -> list[str]:
        endpoint = f"127.0.0.1:{free_port()}"
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                 "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "xlab",
                 "-m", "xlab.train", *TWO_RANKS, *args, f"hydra.run.dir={tmp_path}"] for rank in (0, 1)]
        return launch_nodes(cmds, [os.environ.copy()] * 2)

    first = nodes("trainer.max_steps=16")
    assert sum("2 process(es) on cpu; global batch 8 sequences" in out for out in first) == 1  # rank 0 speaks
    assert sum("checkpoint: " in out for out in first) == 1  # and only it writes
    resumed = nodes("resume=auto")
    assert sum("resumed from" in out and "at step 16" in out for out in resumed) == 1
    assert sorted(p.name for p in tmp_path.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == STEPS // 2 + STEPS // 8
    for key in ("train/loss", "val/loss"):
        ours, ref = records(tmp_path, key), records(ddp_run[0], key)
        assert [r["step"] for r in ours] == [r["step"] for r in ref]
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], abs=1e-5)
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == STEPS and len(state["rank_weight_checksums"]) == 2


def test_slurm_tasks_are_one_distributed_run(ddp_run, tmp_path: Path):
    """What hydra/launcher=slurm starts: one plain `python -m xlab.train` per SLURM task, no torchrun; XLab's
    submitit callback (xlab/sweep.py) turns SLURM's variables into torch.distributed's. Two tasks on two "nodes"
    that are this machine give the curve of one 2-process launch."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(30000 + os.getpid() % 20000), "SLURM_NTASKS": "2",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_LOCALID": "0"}
    slurm["MASTER_PORT"] = str(free_port())  # not the port drawn from the job id: it may be taken on a busy machine
    envs = [{**os.environ, **slurm, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)} for rank in (0, 1)]
    cmd = [sys.executable, "-m", "xlab.train", *TWO_RANKS, "trainer.max_steps=8", f"hydra.run.dir={tmp_path}"]
    outs = launch_nodes([cmd, cmd], envs)
    assert any("submitit task 0 of 2: torch.distributed via localhost" in out for out in outs), outs[0]
    for key in ("train/loss", "val/loss"):
        ours, ref = records(tmp_path, key), [r for r in records(ddp_run[0], key) if r["step"] <= 8]
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in ref], abs=1e-5) and ours


def test_a_taken_master_port_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Rank 0 must listen on MASTER_PORT; another program holding it is named in one line, not a traceback."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(key, value)
        proc = run_cli("train", *TINY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and f"MASTER_PORT={port} is in use" in errors[0], proc.stderr
