"""Shared fixtures: offline env, one token cache per test session, and one tiny trained run for the CLI tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xlab.data.config import DataConfig
from xlab.data.sources import SOURCES, column, document_batches, split_indices

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
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # pytest-xdist: each worker, and the commands it starts, gets its share of the cores
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return cache


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs do not leak settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def restored_logging():
    """In-process Hydra apps configure logging with handlers on pytest's captured streams, which are closed after
    the test; restore every logger's handlers and level so a later test does not write to a closed stream."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    known = {id(lg) for lg, *_ in saved}
    for lg in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(lg, logging.Logger) and id(lg) not in known:
            lg.handlers.clear()


TRACEBACK = "Traceback (most recent call last)"


def debugging(env: dict) -> bool:
    return env.get("XLAB_DEBUG") == "1" or env.get("HYDRA_FULL_ERROR") == "1"


def run_cli(module: str, *args: str, cwd: Path | None = None, check: bool = True,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m xlab.<module> *args`. Suite-wide rule: a CLI prints no traceback, however it ends, unless the
    environment asks for one (XLAB_DEBUG=1 or HYDRA_FULL_ERROR=1): bad input gets one `error:` line, and a
    traceback anywhere else is a bug (docs/reliability.md, Errors). The process is forked from this worker's fork
    server (tests/forkserver.py: the imports of torch, Hydra and Accelerate paid once) unless preexec_fn must run in
    it or XLAB_TEST_FORK=0 asks for a plain interpreter."""
    env = os.environ.copy()
    if preexec_fn is None and env.get("XLAB_TEST_FORK") != "0":
        proc = run_forked(f"xlab.{module}", list(args), cwd or REPO, env, timeout=600)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", f"xlab.{module}", *args], cwd=cwd or REPO, capture_output=True, text=True,
            env=env, timeout=600, preexec_fn=preexec_fn,
        )
    if not debugging(env):  # on stdout only at a line start: generated text may quote Python's docs
        printed = TRACEBACK in proc.stderr or any(line.startswith(TRACEBACK) for line in proc.stdout.splitlines())
        assert not printed, f"xlab.{module} {args} printed a traceback:\n{proc.stdout}\n{proc.stderr}"
    if check and proc.returncode != 0:
        raise AssertionError(f"xlab.{module} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


_FORK_SERVER: dict[str, str] = {}


def fork_server() -> str:
    """The socket of this worker's fork server, started on first use and stopped when the worker exits."""
    if "path" not in _FORK_SERVER:
        import atexit
        import shutil

        folder = Path(tempfile.mkdtemp(prefix="xlab-fork-"))
        path, log = folder / "sock", open(folder / "server.log", "wb")  # noqa: SIM115 (the server's lifetime)
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"), str(path)], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        atexit.register(shutil.rmtree, folder, True)
        atexit.register(proc.kill)  # (atexit runs these last first)
        deadline = time.monotonic() + 120
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server did not start:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.05)
        _FORK_SERVER["path"] = str(path)
    return _FORK_SERVER["path"]


def run_forked(module: str, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python -m module *args` in a child of the fork server: its exit status, stdout and stderr."""
    import signal

    from forkserver import recv_msg, send_msg

    argv = [sys.executable, "-m", module, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(fork_server())
        sock.settimeout(timeout)
        send_msg(sock, {"module": module, "args": args, "cwd": str(cwd), "env": env}, [out.fileno(), err.fileno()])
        pid = recv_msg(sock)[0]["pid"]
        try:
            returncode = recv_msg(sock)[0]["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(argv, timeout) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, returncode, out.read().decode(), err.read().decode())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, offline_env: Path) -> Path:
    """A tiny model trained for 30 steps through the real CLI; returns its run dir."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_cli(
        "train", *TINY, "trainer.max_steps=30", "trainer.eval_every=10", "trainer.ckpt_every=20",
        "trainer.log_every=5", "trainer.eval_batches=4", "scheduler.warmup_steps=5", "logger=tensorboard",
        "trainer.eval_tasks=[xlab_continuation]", "trainer.eval_tasks_limit=16", f"hydra.run.dir={run_dir}",
    )
    return run_dir


def split_ids(data: DataConfig) -> dict[str, list[str]]:
    """The document ids of each split (kept in memory: for tests, not for a full corpus)."""
    ds = SOURCES.get(data.name).load(data, True)
    ids = [i for table in document_batches(ds, data.max_documents) for i in column(table, "id")]
    splits = split_indices(ids, data.split_fractions, data.split_seed)
    return {name: [ids[i] for i in idx] for name, idx in splits.items()}


def lm_loss_sums(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, cross-entropy), each summed over tokens, from materialised logits: the reference that
    head_loss_sums must equal. The objective adds z_loss · logsumexp(logits)², which keeps the softmax normaliser
    near 1 (PaLM) so logits do not drift in bf16."""
    flat = logits.flatten(0, 1).float()
    ce = F.cross_entropy(flat, targets.flatten(), reduction="sum")
    if z_loss == 0:
        return ce, ce
    return ce + z_loss * torch.logsumexp(flat, dim=-1).square().sum(), ce


def tiny_config(**trainer):
    """The in-process tests' run: a 2-layer 32-wide model on the bundled corpus, fp32, no trackers."""
    from omegaconf import OmegaConf

    from xlab.training.config import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.update(n_layer=2, n_head=2, d_model=32, max_len=32)
    cfg.logger.trackers = []
    cfg.trainer.update(**{"precision": "fp32", "eval_batches": 2, "log_every": 2, "eval_every": 4,
                          "ckpt_every": 1000, "max_steps": 8, **trainer})
    return cfg


def free_port() -> int:
    """A TCP port free now (the OS's pick): for servers and rendezvous that must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(commands: list[list[str]], envs: list[dict], cwd: Path | None = None) -> list[str]:
    """Start one process per "node" at once (each waits at the rendezvous for the other); their outputs."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
             for cmd, env, log in zip(commands, envs, logs)]
    deadline = time.monotonic() + 300
    # one node that fails leaves the other waiting at the rendezvous: stop it and report the failure at once
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"node exited {p.returncode}:\n{out}\nthe other nodes:\n" + "\n".join(outs)
    return outs
