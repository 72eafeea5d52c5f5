"""The catalogue of bad inputs: each gives a one-line error naming the value and what is valid, a non-zero exit code,
no traceback, and leaves existing files untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY, run_cli


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unchanged(root: Path, before: dict[str, bytes]) -> bool:
    return snapshot(root) == before


def fails_in_one_line(module: str, *args: str, expect: str) -> str:
    proc = run_cli(module, *args, check=False)
    assert proc.returncode != 0, proc.stdout
    # progress bars of the work done before the problem surfaced may precede it; the error itself is one line
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run's checkpoint that tests may damage."""
    out = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree((tiny_run / "checkpoints" / "last").resolve(), out)
    return out


TRAIN_CASES = [
    (["model=gtp"], "Could not find 'model/gtp'; valid:"),
    (["trainer.max_steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    (["model.n_head=3"], "model.n_head=3 must divide model.d_model=256"),
    (["tokenizer.vocab_size=100"], "tokenizer.vocab_size=100 is too small; it must be >= 260"),
    (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be > 0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
    (["trainer.on_nan=ignore"], "trainer.on_nan=ignore Invalid value 'ignore', expected one of [stop, skip]"),
]


@pytest.mark.parametrize(("args", "expect"), TRAIN_CASES)
def test_bad_train_config(args, expect, tiny_run: Path):
    before = snapshot(tiny_run)
    fails_in_one_line("train", *args, f"hydra.run.dir={tiny_run}", expect=expect)
    assert unchanged(tiny_run, before)  # an existing run dir is not touched


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


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["prompt="], "the prompt is empty"),
        (["prompt=x", "sampler.top_p=1.5"], "sampler.top_p=1.5 must be in (0, 1]"),
        (["prompt=x", "sampler.temperature=-1"], "sampler.temperature=-1.0 must be >= 0"),
        (["prompt=x", "max_new_tokens=-5"], "max_new_tokens=-5 must be >= 0"),
    ],
)
def test_bad_generate_input(args, expect, ckpt: Path):
    fails_in_one_line("generate", f"ckpt={ckpt}", *args, expect=expect)


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

    import torch
    from safetensors.torch import load_file

    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_steps"] for r in records if "skipped_steps" in r]
    assert skipped[-1] >= 1 and skipped == sorted(skipped)
    weights = load_file(tmp_path / "skip" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN updates were dropped
