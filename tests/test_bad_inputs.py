"""The catalogue of bad inputs: each gives a one-line error naming the value and what is valid, exit code 2, no
traceback, and leaves existing files untouched."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unchanged(root: Path, before: dict[str, bytes]) -> bool:
    return snapshot(root) == before


def fails_in_one_line(module: str, *args: str, expect: str) -> str:
    proc = run_cli(module, *args, check=False)
    return one_error_line(proc.returncode, proc.stdout + proc.stderr, proc.stderr, expect)


def one_error_line(code: int, output: str, err: str, expect: str) -> str:
    assert code == 2, output
    # progress bars of the work done before the problem surfaced may precede it; the error itself is one line
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in output
    assert expect in lines[0], lines[0]
    return lines[0]


def fails_in_one_line_in_process(module: str, *args: str, expect: str, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """fails_in_one_line through the same entry point (`xlab.<module>.main`, sys.argv and all) without a new
    interpreter: the catalogue's many cases each cost a start-up otherwise; a sample also runs as a subprocess."""
    # main sets HYDRA_FULL_ERROR=1: setenv first records its value now (delenv of an unset one records nothing), so
    # it is restored for later subprocesses, whose tracebacks it would otherwise let through
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    # (re)loaded now: an entry point reads its debug switch from the environment when its module is imported,
    # which an earlier in-process case may have done while HYDRA_FULL_ERROR=1
    main = importlib.reload(importlib.import_module(f"xlab.{module}")).main
    monkeypatch.setattr(sys, "argv", [f"xlab.{module}", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    one_error_line(exit_info.value.code, out.out + out.err, out.err, expect)


# Each command's bad-input catalogue runs in process; these cases also run as real subprocesses.
SUBPROCESS_SAMPLE = {"model=gtp", "trainer.max_steps=many", "optimizer.lr=nan", "seed=-1", "sampler.top_p=1.5",
                     "device=bogus", "split=dev"}


def check_bad_input(module: str, *args: str, expect: str, capsys, monkeypatch) -> None:
    if SUBPROCESS_SAMPLE & set(args):
        fails_in_one_line(module, *args, expect=expect)
    fails_in_one_line_in_process(module, *args, expect=expect, capsys=capsys, monkeypatch=monkeypatch)


@pytest.fixture(scope="module")
def ckpt(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run's checkpoint that tests may damage."""
    out = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree((tiny_run / "checkpoints" / "last").resolve(), out)
    return out


TRAIN_CASES = [
    (["model=gtp"], "Could not find 'model/gtp'; valid:"),
    (["trainer.max_steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    (["model.n_head=3"], "model.n_head=3 must divide model.d_model=128"),
    (["tokenizer.vocab_size=100"], "tokenizer.vocab_size=100 is too small; it must be >= 260"),
    (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be > 0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
    (["trainer.on_nan=ignore"], "trainer.on_nan=ignore Invalid value 'ignore', expected one of [stop, skip]"),
    # the old boolean spelling: the one-line error lists the three values
    (["trainer.compile=true"], "trainer.compile=true Invalid value 'True', expected one of [auto, on, off]"),
    # numbers: finite, and in the range the schema gives each field (xlab/schema.py)
    (["optimizer.eps=-1"], "optimizer.eps=-1.0 must be > 0"),
    (["optimizer.lr=nan"], "optimizer.lr=nan must be a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number > 0"),
    (["optimizer.adam_lr=-1"], "optimizer.adam_lr=-1.0 must be > 0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be >= 0"),
    (["optimizer.momentum=1"], "optimizer.momentum=1.0 must be in [0, 1)"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    (["model.init_std=nan"], "model.init_std=nan must be a finite number > 0"),
    (["model.n_kv_head=0"], "model.n_kv_head=0 must be >= 1 (or null: n_head)"),
    (["model.norm_eps=inf"], "model.norm_eps=inf must be a finite number > 0"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be > 0"),
    (["model.rope_theta=-10000"], "model.rope_theta=-10000.0 must be > 0"),
    (["model.logit_softcap=nan"], "model.logit_softcap=nan must be a finite number > 0 (or null to disable)"),
    (["model.dropout=1"], "model.dropout=1.0 must be in [0, 1)"),
    (["model.d_ff=0"], "model.d_ff=0 must be >= 1"),
    (["model.z_loss=-1"], "model.z_loss=-1.0 must be >= 0"),
    (["model.max_len=0"], "model.max_len=0 must be >= 1"),
    (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    (["seed=99999999999999999999"], "seed=99999999999999999999 must be in [0, 4294967295]"),
    (["trainer.grad_clip=nan"], "trainer.grad_clip=nan must be a finite number >= 0 (0 disables clipping)"),
    (["trainer.grad_accum_steps=1000000000"], "trainer.grad_accum_steps=1000000000 must be in [1, 1024]"),
    (["trainer.keep_last=0"], "trainer.keep_last=0 must be >= 1"),
    (["trainer.max_time_s=inf"], "trainer.max_time_s=inf must be a finite number > 0"),
    (["trainer.early_stop_patience=0"], "trainer.early_stop_patience=0 must be >= 1"),
    (["trainer.eval_every=0"], "trainer.eval_every=0 must be >= 1"),
    (["trainer.eval_tasks=[hellaswag]"], "Invalid value 'hellaswag', expected one of [xlab_continuation, xlab_cloze]"),
    (["trainer.eval_tasks_limit=0"], "trainer.eval_tasks_limit=0 must be >= 1"),
    (["scheduler.min_lr_ratio=1.5"], "scheduler.min_lr_ratio=1.5 must be in [0, 1]"),
    (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps=-1 must be >= 0"),
    (["scheduler.decay_fraction=nan"], "scheduler.decay_fraction=nan must be a finite number in [0, 1]"),
    (["data.shard_size_mb=0"], "data.shard_size_mb=0.0 must be > 0"),
    (["data.max_documents=0"], "data.max_documents=0 must be >= 1"),
    (["data.split_fractions=[0.9,nan,0.05,0.05]"], "data.split_fractions=[0.9, nan, 0.05, 0.05] must be finite"),
    (["tokenizer.min_frequency=-1"], "tokenizer.min_frequency=-1 must be >= 0"),
    (["tokenizer.train_docs=0"], "tokenizer.train_docs=0 must be >= 1"),
    (["trainer.compile=on", "trainer.compile_backend=nope"], "trainer.compile_backend='nope' is not a torch.compile"),
    # what FSDP does not run, and what would
    (["trainer.strategy=fsdp", "optimizer=muon"], "optimizer.name=muon does not run under trainer.strategy=fsdp"),
    (["trainer.strategy=fsdp", "trainer.compile=on"], "trainer.compile=on is not supported with"),
    (["trainer.strategy=fsdp", "trainer.precision=fp16"], "trainer.precision=fp16 is not supported with"),
]


@pytest.mark.parametrize(("args", "expect"), TRAIN_CASES)
def test_bad_train_config(args, expect, tiny_run: Path, capsys, monkeypatch):
    before = snapshot(tiny_run)
    check_bad_input("train", *args, f"hydra.run.dir={tiny_run}", expect=expect, capsys=capsys, monkeypatch=monkeypatch)
    assert unchanged(tiny_run, before)  # an existing run dir is not touched


def test_accelerate_fsdp_plugin_is_refused(tiny_run: Path, capsys, monkeypatch):
    """A launch config with distributed_type: FSDP would hand the model to Accelerate's plugin, which XLab does not
    use (it shards the model itself: xlab/training/parallel.py)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    before = snapshot(tiny_run)
    fails_in_one_line_in_process("train", f"hydra.run.dir={tiny_run}", expect="ACCELERATE_USE_FSDP=true",
                                 capsys=capsys, monkeypatch=monkeypatch)
    assert unchanged(tiny_run, before)


def test_corpus_smaller_than_one_window(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i}.txt").write_text(f"tiny document {i}.", encoding="utf-8")
    fails_in_one_line("train", *TINY, "data=text_files", f"data.data_files={docs}/*.txt", "model.max_len=512",
                      "tokenizer.vocab_size=300", f"hydra.run.dir={tmp_path / 'run'}", expect="fewer than one window")


@pytest.mark.parametrize(("content", "expect"), [(b"", "empty"), (b"caf\xe9 cr\xe8me\n" * 50, "UTF-8")])
def test_empty_or_non_utf8_text_file(content: bytes, expect: str, tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bad.txt").write_bytes(content)
    fails_in_one_line("train", *TINY, "data=text_files", f"data.data_files={docs}/*.txt",
                      f"hydra.run.dir={tmp_path / 'run'}", expect=expect)


def test_missing_checkpoint(tmp_path: Path):
    for module, extra in (("evaluate", []), ("generate", ["prompt=x"]), ("export", [])):
        fails_in_one_line(module, f"ckpt={tmp_path / 'nope'}", *extra, expect="does not exist")


def test_checkpoint_without_weights(ckpt: Path, tmp_path: Path):
    broken = tmp_path / "noweights"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").unlink()
    fails_in_one_line("evaluate", f"ckpt={broken}", expect="model.safetensors is missing")


def test_truncated_safetensors(ckpt: Path, tmp_path: Path):
    broken = tmp_path / "truncated"
    shutil.copytree(ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails_in_one_line("generate", f"ckpt={broken}", "prompt=x", expect="cannot read weights")


def test_checkpoint_of_another_shape(ckpt: Path, tmp_path: Path):
    broken = tmp_path / "reshaped"
    shutil.copytree(ckpt, broken)
    config = (broken / "config.yaml").read_text()
    (broken / "config.yaml").write_text(config.replace("d_model: 64", "d_model: 96"))
    fails_in_one_line("evaluate", f"ckpt={broken}", expect="do not fit the model in its config.yaml")


NO_CUDA = "device=cuda: there is no CUDA device here"


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["prompt="], "the prompt is empty"),
        (["prompt=x", "sampler.top_p=1.5"], "sampler.top_p=1.5 must be in (0, 1]"),
        (["prompt=x", "sampler.temperature=-1"], "sampler.temperature=-1.0 must be >= 0"),
        (["prompt=x", "max_new_tokens=-5"], "max_new_tokens=-5 must be >= 0"),
        (["prompt=x", "sampler.temperature=1e-45"], "sampler.temperature=1e-45 must be >= 0.0001 (or 0: greedy)"),
        (["prompt=x", "temperature=nan"], "temperature=nan must be a finite number >= 0.0001"),
        (["prompt=x", "sampler.repetition_penalty=1e-45"], "sampler.repetition_penalty=1e-45 must be >= 0.0001"),
        (["prompt=x", "sampler=beam", "max_new_tokens=0"], "max_new_tokens=0 with sampler=beam: beam search needs"),
        (["prompt=x", "sampler=beam", "sampler.num_beams=0"], "sampler.num_beams=0 must be >= 1"),
        (["prompt=x", "sampler.length_penalty=inf"], "sampler.length_penalty=inf must be finite"),
        (["prompt=x", "sampler.top_k=-1"], "sampler.top_k=-1 must be >= 0 (0 = off)"),
        (["prompt=x", "num_samples=0"], "num_samples=0 must be >= 1"),
        (["prompt=x", "seed=-1"], "seed=-1 must be in [0, 4294967295]"),
        (["prompt=x", "device=bogus"], "device='bogus' is not a device; valid: auto, cpu, cuda, cuda:N, mps"),
        (["prompt=x", "dtype=int4"], "Invalid value 'int4', expected one of [auto, fp32, bf16, fp16, int8]"),
        (["prompt=x", "compile=maybe"], "Invalid value 'maybe', expected one of [auto, on, off]"),
        (["prompt=x", "cache=paged"], "Invalid value 'paged', expected one of [auto, static, dynamic]"),
        (["prompt=x", "compile=on", "cache=dynamic"], "compile=on with cache=dynamic: the compiled step needs"),
        (["prompt=x", "draft=/no/such/ckpt"], "checkpoint path '/no/such/ckpt' does not exist"),
        (["prompt=x", "draft=/no/such/ckpt", "sampler=beam"], "draft= works with sampler=greedy|multinomial|top_k"),
        (["prompt=x", "draft_tokens=0"], "draft_tokens=0 must be in [1, 16]"),
        pytest.param(["prompt=x", "device=cuda"], NO_CUDA.replace("=cuda", "='cuda'"),
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
    ],
)
def test_bad_generate_input(args, expect, ckpt: Path, capsys, monkeypatch):
    check_bad_input("generate", f"ckpt={ckpt}", *args, expect=expect, capsys=capsys, monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["max_batches=-1"], "max_batches=-1 must be >= 1 (or null: the whole split)"),
        (["batch_size=0"], "batch_size=0 must be >= 1"),
        (["split=dev"], "Invalid value 'dev', expected one of [train, val, test, predict]"),
        (["device=bogus"], "device='bogus' is not a device; valid: auto, cpu, cuda, cuda:N, mps"),
        (["device=cuda:x"], "device='cuda:x' is not a device"),
        pytest.param(["device=cuda"], NO_CUDA.replace("=cuda", "='cuda'"),
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
    ],
)
def test_bad_evaluate_input(args, expect, ckpt: Path, capsys, monkeypatch):
    before = snapshot(ckpt)
    check_bad_input("evaluate", f"ckpt={ckpt}", *args, expect=expect, capsys=capsys, monkeypatch=monkeypatch)
    assert unchanged(ckpt, before)  # no eval_<split>.json: max_batches=-1 used to score all windows but one batch


def damaged_config(ckpt: Path, tmp_path: Path, edit) -> Path:
    broken = tmp_path / "config"
    shutil.copytree(ckpt, broken)
    (broken / "config.yaml").write_text(edit((broken / "config.yaml").read_text()))
    return broken


CONFIG_EDITS = [
    (lambda text: text.replace("data:\n", "data:\n  colour: blue\n"), "evaluate",
     "config.yaml, data: Key 'colour' not in 'DataConfig'"),
    (lambda text: text.replace("data:\n", "data:\n  colour: blue\n"), "generate",
     "config.yaml, data: Key 'colour' not in 'DataConfig'"),
    (lambda text: text.replace("tokenizer:\n", "tokenizer:\n  colour: blue\n"), "export",
     "config.yaml, tokenizer: Key 'colour' not in 'TokenizerConfig'"),
    (lambda text: text + "\nmodel: [unclosed\n", "evaluate", "cannot read"),
    (lambda text: text + "\nmodel: [unclosed\n", "generate", "cannot read"),
    (lambda text: "- a list\n- of lines\n", "evaluate", "is not a mapping of config groups"),
    (lambda text: text.replace("shard_size_mb: 1024.0", "shard_size_mb: -1"), "evaluate",
     "config.yaml, data: data.shard_size_mb=-1.0 must be > 0"),
    (lambda text: re.sub(r"^model:\n(  .*\n)+", "", text, flags=re.M), "generate",
     "config.yaml has no model: mapping"),
]


@pytest.mark.parametrize(("edit", "module", "expect"), CONFIG_EDITS)
def test_damaged_checkpoint_config(edit, module: str, expect: str, ckpt: Path, tmp_path: Path, capsys, monkeypatch):
    broken = damaged_config(ckpt, tmp_path, edit)
    before = snapshot(broken)
    extra = {"generate": ["prompt=x"], "export": [f"out={tmp_path / 'export'}"]}.get(module, [])
    if expect == CONFIG_EDITS[0][2]:  # one case also as a real subprocess; the rest in process (a start-up each)
        fails_in_one_line(module, f"ckpt={broken}", *extra, expect=expect)
    fails_in_one_line_in_process(module, f"ckpt={broken}", *extra, expect=expect, capsys=capsys,
                                 monkeypatch=monkeypatch)
    assert unchanged(broken, before) and not (tmp_path / "export").exists()


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    return run


RESUME_DAMAGE = [
    ("state.json", lambda data: data[: len(data) // 2], "state.json is damaged (JSONDecodeError"),
    ("state.json", lambda data: b'{"tokens": 1}', "state.json is damaged (KeyError: 'step')"),
    ("state.json", lambda data: b"[1, 2]", "state.json is damaged (TypeError"),
    ("optimizer.bin", lambda data: data[: len(data) // 2], "optimizer.bin is damaged or truncated"),
    ("scheduler.bin", lambda data: b"", "scheduler.bin is damaged or truncated"),
]


@pytest.mark.parametrize(("name", "damage", "expect"), RESUME_DAMAGE)
def test_resume_from_a_damaged_checkpoint(name: str, damage, expect: str, tiny_run: Path, tmp_path: Path, capsys,
                                          monkeypatch):
    run = copy_run(tiny_run, tmp_path)
    target = (run / "checkpoints" / "last").resolve() / name
    target.write_bytes(damage(target.read_bytes()))
    before = snapshot(run)
    args = [*TINY, "trainer.max_steps=40", "resume=auto", f"hydra.run.dir={run}"]
    if expect == RESUME_DAMAGE[0][2]:  # one case also as a real subprocess
        fails_in_one_line("train", *args, expect=f"cannot resume from {target.parent}: {expect}")
    fails_in_one_line_in_process("train", *args, expect=f"cannot resume from {target.parent}: {expect}",
                                 capsys=capsys, monkeypatch=monkeypatch)
    assert unchanged(run, before)  # checked before Hydra writes into the run dir


def no_room_for_a_checkpoint() -> None:
    """In the CLI's process: files may not grow past 4 MB, as on a full disk (the optimizer state is larger)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_disk_full_during_a_checkpoint_save(tiny_run: Path, tmp_path: Path):
    run = copy_run(tiny_run, tmp_path)
    checkpoints = run / "checkpoints"
    last = os.readlink(checkpoints / "last")
    before = snapshot(checkpoints / last)
    proc = run_cli("train", *TINY, "trainer.max_steps=31", "trainer.eval_batches=1", "resume=auto",
                   f"hydra.run.dir={run}", check=False, preexec_fn=no_room_for_a_checkpoint)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"cannot write checkpoint {checkpoints / 'step_000031'} (is the disk full?)" in lines[0]
    assert lines[0].endswith(f"checkpoints/last still points at {last}")
    assert os.readlink(checkpoints / "last") == last and unchanged(checkpoints / last, before)
    assert not list(checkpoints.glob(".tmp_*"))  # the partial checkpoint is removed: its space is given back


def test_parquet_text_column_of_integers(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tmp_path / "docs"
    docs.mkdir()
    pq.write_table(pa.table({"text": list(range(100))}), docs / "numbers.parquet")
    (docs / "broken.parquet").write_text("not parquet")
    fails_in_one_line("train", *TINY, "data=text_files", f"data.data_files={docs}/numbers.parquet",
                      f"hydra.run.dir={tmp_path / 'run'}", expect="data.text_column='text' in")
    fails_in_one_line("train", *TINY, "data=text_files", f"data.data_files={docs}/broken.parquet",
                      f"hydra.run.dir={tmp_path / 'run'}", expect="as parquet")
    assert not (tmp_path / "run").exists()  # found before Hydra creates the run dir


def write_docs(directory: Path, n: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"{i:02d}.txt").write_text(f"Document {i:02d} talks about topic {i:02d} at length. " * 20)


def documents_per_split(proc) -> dict[str, int]:
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "documents per split:" in ln)
    return ast.literal_eval(line.split("documents per split:", 1)[1].strip())


PREPARE = ["data=text_files", "tokenizer.vocab_size=300"]


def test_symlink_loop_in_the_corpus_is_followed_once(tmp_path: Path):
    docs = tmp_path / "docs"
    write_docs(docs, 10)
    (docs / "again").symlink_to(docs, target_is_directory=True)  # docs/again/again/... until the OS gives up
    (docs / "same.txt").symlink_to(docs / "03.txt")  # one file under two names is one document
    proc = run_cli("prepare", *PREPARE, f"data.data_files={docs}", f"hydra.run.dir={tmp_path / 'run'}")
    assert sum(documents_per_split(proc).values()) == 10  # was 410: copies of train documents in val and test


def test_corpus_edit_that_keeps_size_and_mtime_is_seen(tmp_path: Path):
    docs = tmp_path / "docs"
    write_docs(docs, 12)
    args = [*PREPARE, f"data.data_files={docs}", f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli("prepare", *args)
    edited = docs / "05.txt"
    stat = edited.stat()
    edited.write_text(edited.read_text().replace("topic 05", "topic 50"))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `touch -r`, `cp -p` or `rsync -t` leave it
    assert edited.stat().st_size == stat.st_size and edited.stat().st_mtime_ns == stat.st_mtime_ns
    second = run_cli("prepare", *args)
    out = second.stdout + second.stderr
    assert "reusing cached token files" not in out and "wrote token files" in out, out
    tokens_dir = re.compile(r"token files: (\S+)")
    assert tokens_dir.search(first.stdout + first.stderr)[1] != tokens_dir.search(out)[1]


def test_output_dir_not_writable(ckpt: Path, tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    fails_in_one_line("train", *TINY, f"hydra.run.dir={blocker}/run", expect=str(blocker))
    fails_in_one_line("export", f"ckpt={ckpt}", f"out={blocker}/export", expect=str(blocker))
    assert blocker.read_text() == "not a directory"


def test_diverging_run_stops_with_a_debug_checkpoint_or_skips(tmp_path: Path):
    diverge = [*TINY, "optimizer.lr=1e30", "scheduler.warmup_steps=0", "trainer.precision=fp32",
               "trainer.max_steps=6", "trainer.log_every=3", "trainer.eval_batches=1"]
    line = fails_in_one_line("train", *diverge, f"hydra.run.dir={tmp_path / 'stop'}",
                             expect="the loss became NaN/inf at step 2")
    assert (tmp_path / "stop" / "checkpoints" / "nan_step_000002" / "model.safetensors").is_file()
    assert "nan_step_000002" in line and not (tmp_path / "stop" / "checkpoints" / "last").exists()

    run_cli("train", *diverge, "trainer.on_nan=skip", f"hydra.run.dir={tmp_path / 'skip'}")
    import json

    from safetensors.torch import load_file

    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in records if "skipped_steps" in r]
    assert skipped[-1] >= 1 and skipped == sorted(skipped)
    weights = load_file(tmp_path / "skip" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN updates were dropped


SERVE_CKPT = f"ckpt={Path(__file__).parent / 'fixtures' / 'ckpt_435677f' / 'step_000003'}"


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ([], "missing mandatory value: ckpt"),
        (["ckpt=/no/such/ckpt"], "checkpoint path '/no/such/ckpt' does not exist"),
        ([SERVE_CKPT, "ckpt2=/no/such/ckpt"], "checkpoint path '/no/such/ckpt' does not exist"),
        ([SERVE_CKPT, SERVE_CKPT.replace("ckpt=", "ckpt2=")], "ckpt2 is the same checkpoint as ckpt"),
        ([SERVE_CKPT, "port=70000"], "port=70000 must be in [1, 65535]"),
        ([SERVE_CKPT, "port=0"], "port=0 must be in [1, 65535]"),
        ([SERVE_CKPT, "port=http"], "Value 'http' of type 'str' could not be converted to Integer"),
        ([SERVE_CKPT, "host=0.0.0.0"], "host=0.0.0.0 is not a loopback address"),
        ([SERVE_CKPT, "max_batch_rows=0"], "max_batch_rows=0 must be in [1, 4096]"),
        ([SERVE_CKPT, "batch_window_ms=-1"], "batch_window_ms=-1.0 must be in [0, 10000]"),
        ([SERVE_CKPT, "device=bogus"], "device='bogus' is not a device"),
        ([SERVE_CKPT, "compile=on", "cache=dynamic"], "compile=on with cache=dynamic"),
    ],
)
def test_bad_serve_input(args, expect, capsys, monkeypatch):
    """Refused before any model loads or port opens (xlab/serve/__main__.py); the host rule also as a process."""
    if "host=0.0.0.0" in args:
        fails_in_one_line("serve", *args, expect=expect)
    fails_in_one_line_in_process("serve.__main__", *args, expect=expect, capsys=capsys, monkeypatch=monkeypatch)


def test_a_file_system_without_locks_is_one_line_naming_the_escape(tmp_path: Path, capsys, monkeypatch):
    """Some NFS and FUSE mounts have no flock: the run dir's lock fails in one line naming the file system and
    XLAB_NO_LOCK=1, and with it set the run goes ahead unlocked."""
    import errno
    import fcntl

    def no_locks(*_args) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=1", "trainer.eval_batches=1", f"hydra.run.dir={run}"]
    fails_in_one_line_in_process("train", *args, expect="file system there does not support file locks (No locks "
                                 "available); set XLAB_NO_LOCK=1 to run without them", capsys=capsys,
                                 monkeypatch=monkeypatch)
    assert not (run / "checkpoints").exists()
    monkeypatch.setenv("XLAB_NO_LOCK", "1")
    monkeypatch.setattr(sys, "argv", ["xlab.train", *args])
    importlib.import_module("xlab.train").main()
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
