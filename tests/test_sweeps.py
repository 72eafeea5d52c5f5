"""Sweeps through the real CLI: a grid multirun, an Optuna search and a submitit job of two ranks, each with the
summary table checked against every job's metrics.jsonl. Multi-node files: the SLURM launcher config composes, the
Accelerate configs load, and the sbatch script runs torchrun (with stand-ins for srun and scontrol)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import warnings
from pathlib import Path

import pytest
from conftest import REPO, TINY, free_port, launch_nodes, run_cli
from omegaconf import OmegaConf

SWEEP_TINY = [arg for arg in TINY if not arg.startswith("model.n_layer=")] + [
    "trainer.max_steps=2", "trainer.eval_batches=1", "scheduler.warmup_steps=1"]


def job_metrics(job_dir: Path) -> dict:
    """What the summary should say about a job, computed here from its metrics.jsonl."""
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/loss" in r]
    return {"step": max(r["step"] for r in records), "tokens": max(r["tokens"] for r in records),
            "val_loss": val[-1]["val/loss"], "val_accuracy": val[-1]["val/accuracy"],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in records if "train/loss" in r)}


def check_summary(sweep: Path, n_jobs: int) -> list[dict]:
    """summary.csv has one row per job dir, in job order, with that job's final numbers; summary.md shows them."""
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["job"] for row in rows] == [str(i) for i in range(n_jobs)]
    md = (sweep / "summary.md").read_text()
    for row in rows:
        job_dir = sweep / row["dir"]
        assert job_dir == sweep / row["job"]
        assert (job_dir / "checkpoints" / "last" / "state.json").is_file()
        expected = job_metrics(job_dir)
        assert int(row["step"]) == expected["step"] and int(row["tokens"]) == expected["tokens"]
        for key in ("val_loss", "val_accuracy", "tok_per_s"):
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-12), key
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        assert {k: row[k] for k in overrides} == overrides
        assert f"| {row['job']} |" in md and f"{expected['val_loss']:.4f}" in md
    return rows


def test_grid_sweep_job_dirs_summary_and_plot(tmp_path: Path):
    sweep = tmp_path / "grid"
    proc = run_cli("train", "-m", "model.n_layer=1,2", "optimizer.lr=3e-3", *SWEEP_TINY, f"hydra.sweep.dir={sweep}")
    assert "sweep summary (2 jobs)" in proc.stdout + proc.stderr
    rows = check_summary(sweep, 2)
    assert [(r["model.n_layer"], r["optimizer.lr"]) for r in rows] == [("1", "0.003"), ("2", "0.003")]
    md = (sweep / "summary.md").read_text()
    assert "| job | model.n_layer | val loss |" in md  # only the swept keys get columns
    assert "Common overrides: `optimizer.lr=0.003 model.n_head=2" in md
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert f"Best: job {best['job']} " in md

    # the summary CLI rebuilds the same table; the plot CLI draws the sweep's jobs into the sweep dir
    (sweep / "summary.md").unlink()
    assert run_cli("sweep", str(sweep)).stdout == md and (sweep / "summary.md").read_text() == md
    assert "wrote" in run_cli("plot", str(sweep)).stdout and (sweep / "curves.png").stat().st_size > 10_000


def test_a_bad_value_in_any_job_of_a_grid_is_refused_before_the_first_job_runs(tmp_path: Path):
    """Every job of a -m grid is checked up front (xlab/cli.py prevalidate): the second job's learning rate is bad,
    so the sweep ends in one line before job 0 trains, and nothing is written."""
    sweep = tmp_path / "grid"
    proc = run_cli("train", "-m", "optimizer.lr=3e-3,-1", "model.n_layer=1,2", *SWEEP_TINY,
                   f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: optimizer.lr=-1.0 must be > 0\n", proc.stderr
    assert "Launching" not in proc.stdout + proc.stderr and not sweep.exists()


def test_optuna_search_minimises_the_returned_val_loss(tmp_path: Path):
    sweep = tmp_path / "optuna"
    db = tmp_path / "optuna.db"  # SQLite storage: the part that needs sqlalchemy<2 (in-memory is the default)
    run_cli("train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "model.n_layer=choice(1,2)",
            f"hydra.sweeper.storage=sqlite:///{db}", *SWEEP_TINY, f"hydra.sweep.dir={sweep}")
    rows = check_summary(sweep, 3)
    for row in rows:  # the default range of optimizer.lr (configs/hparams_search/optuna.yaml), and the given choice
        assert 1e-4 <= float(row["optimizer.lr"]) <= 1e-2 and row["model.n_layer"] in ("1", "2")
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert results.best_value == pytest.approx(float(best["val_loss"]), rel=1e-12)
    assert results.best_params["optimizer.lr"] == pytest.approx(float(best["optimizer.lr"]), rel=1e-12)
    with warnings.catch_warnings():  # optuna 2's SQLAlchemy models use APIs that SQLAlchemy 1.4 flags for 2.0
        warnings.simplefilter("ignore")
        import optuna

        study = optuna.load_study(study_name="xlab", storage=f"sqlite:///{db}")
    assert sorted(t.value for t in study.trials) == sorted(float(r["val_loss"]) for r in rows)


def test_submitit_local_job_of_two_tasks_is_one_distributed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sweep = tmp_path / "submitit"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # not the port drawn from the job id: it may be taken
    run_cli("train", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "model.n_layer=1",
            *SWEEP_TINY, f"hydra.sweep.dir={sweep}")
    check_summary(sweep, 1)
    last = sweep / "0" / "checkpoints" / "last"
    state = json.loads((last / "state.json").read_text())
    assert state["tokens"] == 2 * 8 * 64 * 2  # steps x batch x context x ranks
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()


def test_slurm_launcher_config_composes():
    proc = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    launcher = OmegaConf.create(proc.stdout).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert "deprecated" not in proc.stderr  # our file extends the plugin's schema instead of shadowing it


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    multi = load_config_from_file(str(REPO / "configs" / "accelerate" / "multi_node.yaml"))
    assert (multi.distributed_type, multi.num_machines, multi.num_processes) == ("MULTI_GPU", 2, 16)
    gpus = load_config_from_file(str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"))
    assert (gpus.distributed_type, gpus.num_machines, gpus.num_processes) == ("MULTI_GPU", 1, 8)


def test_sbatch_script_on_two_nodes_is_one_run_in_a_fixed_run_dir(tmp_path: Path):
    """The script as SLURM would run it on the two nodes of a job, both this machine, with srun and scontrol
    replaced: the SLURM variables it reads give one torchrun per node meeting at the first node, one CPU rank each,
    one run dir (resume=auto)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && printf "localhost\\nnode2\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit=1
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    job, port = str(4000 + os.getpid() % 1000), free_port()  # the script's default port is 20000 + job id
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "xlab",
           "MASTER_PORT": str(port),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost,node2", "GPUS_PER_NODE": "1",
           "OMP_NUM_THREADS": "1"}
    outs = launch_nodes([["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *SWEEP_TINY]] * 2,
                        [{**env, "SLURM_NODEID": str(node)} for node in (0, 1)], cwd=tmp_path)
    assert all(f"2 nodes x 1 GPUs, rendezvous localhost:{port}, run dir outputs/slurm/xlab-{job}" in out
               for out in outs)
    run = tmp_path / "outputs" / "slurm" / f"xlab-{job}"
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.jsonl")] == [run.relative_to(tmp_path) /
                                                                                  "metrics.jsonl"]
    last = run / "checkpoints" / "last"
    assert json.loads((last / "state.json").read_text())["tokens"] == 2 * 8 * 64 * 2  # two ranks
    assert (last / "random_states_1.pkl").is_file()


def test_summary_leaves_out_jobs_of_an_earlier_sweep_into_the_same_dir(tmp_path: Path):
    from xlab.training.runs import find_jobs, job_stamps

    (tmp_path / "multirun.yaml").write_text("{}\n")
    for num in (0, 1):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model.n_layer={num + 1}\n")
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (job / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 8, "val/loss": 5.0 + num,
                                                       "val/accuracy": 1.0}) + "\n")
    before = job_stamps(tmp_path)
    assert [j.num for j in find_jobs(tmp_path)] == [0, 1]
    rewritten = tmp_path / "0" / ".hydra" / "overrides.yaml"  # the new sweep ran job 0 only
    os.utime(rewritten, (rewritten.stat().st_atime, rewritten.stat().st_mtime + 5))
    (job,) = find_jobs(tmp_path, before=before)
    assert (job.num, job.overrides, job.val_loss, job.tok_per_s) == (0, {"model.n_layer": "1"}, 5.0, None)
