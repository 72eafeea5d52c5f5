"""End to end through the real CLIs in subprocesses: train → checkpoint → evaluate → generate → export."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import TINY, run_cli

CKPT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "config.yaml",
              "tokenizer.json", "state.json"}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def test_train_writes_checkpoints_metrics_and_events(tiny_run: Path):
    ckpts = tiny_run / "checkpoints"
    names = {p.name for p in ckpts.iterdir()}
    # ckpt_every=20 and the last step, plus one per evaluation (every 10) that set a new best val loss
    assert {"last", "best", "step_000020", "step_000030"} <= names <= {"last", "best", *(f"step_{s:06d}" for s in
                                                                                           (10, 20, 30))}
    vals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines() if "val/loss" in line]
    assert (ckpts / "best").resolve().name == f"step_{min(vals, key=lambda r: r['val/loss'])['step']:06d}"
    assert (ckpts / "last").is_symlink() and (ckpts / "last").resolve() == (ckpts / "step_000030").resolve()
    for step in ("step_000020", "step_000030"):
        assert CKPT_FILES <= {p.name for p in (ckpts / step).iterdir()}
    state = json.loads((ckpts / "last" / "state.json").read_text())
    assert state["step"] == 30 and state["tokens"] == 30 * 8 * 64 and state["sampler"] == {"batches_drawn": 30}

    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/loss" in r]
    val = [r for r in lines if "val/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val] == [10, 20, 30]
    for r in train:
        assert {"step", "tokens", "train/loss", "lr", "tok_per_s"} <= set(r)
        assert math.isfinite(r["train/loss"]) and r["tok_per_s"] > 0
    assert all(0 <= r["val/accuracy"] <= 100 for r in val)
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert list((tiny_run / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(tiny_run / "tensorboard" / "xlab")).Reload()  # the scalars (hparams: a subdir)
    for key in ("val/loss", "tasks/xlab_continuation/acc", "tasks/xlab_continuation/acc_norm"):  # in-loop task
        events = logged.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in val]
        assert [e.value for e in events] == pytest.approx([r[key] for r in val], rel=1e-6)  # stored as float32


def test_evaluate_generate_export(tiny_run: Path, tmp_path: Path):
    ckpt = tiny_run / "checkpoints" / "last"
    out = run_cli("evaluate", f"ckpt={ckpt}", "split=val").stdout
    assert "loss" in out and "accuracy (%)" in out and "perplexity" in out and "bits per byte" in out
    result = json.loads((ckpt / "eval_val.json").read_text())
    assert set(result) == {"loss", "accuracy", "perplexity", "tokens", "bits_per_byte", "bytes", "precision"}
    assert result["precision"] in ("fp32", "bf16")  # auto resolved (xlab.device.auto_precision)
    assert 0 < result["loss"] < 20 and result["tokens"] > 0
    assert math.isclose(result["perplexity"], math.exp(result["loss"]), rel_tol=1e-6)

    text = run_cli("generate", f"ckpt={ckpt}", "prompt=The list", "max_new_tokens=20", "seed=0").stdout.strip()
    assert text.startswith("The list") and len(text) > len("The list")

    export = tmp_path / "export"
    run_cli("export", f"ckpt={ckpt}", f"out={export}")
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "tokenizer.json", "config.yaml"}
    assert dir_size(export) < 0.6 * dir_size(ckpt.resolve())
    run_cli("evaluate", f"ckpt={export}", "split=val")
    exported = json.loads((export / "eval_val.json").read_text())
    assert exported["loss"] == pytest.approx(result["loss"], abs=1e-6)
    from_export = run_cli("generate", f"ckpt={export}", "prompt=The list", "max_new_tokens=20", "seed=0")
    assert from_export.stdout.strip() == text  # the same weights, and seeded sampling reproduces

    refused = run_cli("export", f"ckpt={ckpt}", f"out={export}", check=False)
    assert refused.returncode != 0 and "not empty" in refused.stderr


def test_seed_readme_snippet_runs(tiny_run: Path):
    """The seed README's "Use in your code" snippet, with only the checkpoint path and device changed."""
    import torch

    from xlab import inference
    from xlab.datamodules import XLabDataModule
    from xlab.models import XLabModel

    # adjust these
    checkpoint_path = str(tiny_run / "checkpoints" / "last")
    prompt = 'april'
    device = 'cpu'
    limit = 10

    tokenizer = XLabDataModule.load_from_checkpoint(checkpoint_path, map_location=device).tokenizer
    model = XLabModel.load_from_checkpoint(checkpoint_path, map_location=device).eval().requires_grad_(False)
    inputs = torch.tensor([tokenizer[tokenizer.sos_token]] + tokenizer.encode(prompt), device=model.device)
    outputs = inference.sample(
        model, inputs,
        output_length=limit, block_size=model.hparams['max_len'],
        eos_class=tokenizer[tokenizer.eos_token]
    )
    output = tokenizer.decode(outputs)

    assert isinstance(output, str)
    assert 0 < len(outputs) <= limit or output == ""
    assert all(0 <= t < len(tokenizer) for t in outputs)


def test_second_run_reuses_tokenizer_and_token_files(tiny_run: Path, offline_env: Path, tmp_path: Path):
    cached = sorted(p for p in offline_env.rglob("*") if p.is_file())
    assert any(p.name == "tokenizer.json" for p in cached) and any(p.name == "train.bin" for p in cached)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    proc = run_cli("train", *TINY, "trainer.max_steps=2", "trainer.eval_batches=1", f"hydra.run.dir={tmp_path}")
    log = proc.stdout + proc.stderr
    assert "reusing cached tokenizer" in log and "reusing cached token files" in log
    assert "training bpe tokenizer" not in log and "wrote token files" not in log
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps


def test_resume_auto_continues_in_the_run_dir(tmp_path: Path):
    common = [*TINY, "trainer.eval_batches=1", "trainer.ckpt_every=3", f"hydra.run.dir={tmp_path}"]
    run_cli("train", *common, "trainer.max_steps=3")
    proc = run_cli("train", *common, "trainer.max_steps=6", "resume=auto")
    assert "resumed from" in proc.stdout + proc.stderr
    state = json.loads((tmp_path / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 6 and state["sampler"]["batches_drawn"] == 6
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6


def test_generate_samplers_prompts_file_and_jsonl(tiny_run: Path, tmp_path: Path):
    ckpt = tiny_run / "checkpoints" / "last"
    beam = run_cli("generate", f"ckpt={ckpt}", "prompt=The list", "sampler=beam", "sampler.num_beams=3",
                   "sampler.num_return_sequences=2", "max_new_tokens=8", "output=jsonl").stdout.splitlines()
    rows = [json.loads(line) for line in beam]
    assert len(rows) == 2 and all(set(r) == {"prompt", "text", "tokens", "score"} for r in rows)
    assert rows[0]["score"] >= rows[1]["score"] and all(len(r["tokens"]) <= 8 for r in rows)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The list\n\nReturn a\nA dict\n", encoding="utf-8")
    out = run_cli("generate", f"ckpt={ckpt}", f"prompts_file={prompts}", "num_samples=2", "max_new_tokens=6",
                  "sampler=top_k", "sampler.top_k=20", "output=jsonl", "batch_size=4").stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == ["The list"] * 2 + ["Return a"] * 2 + ["A dict"] * 2
    assert all("score" not in r and 1 <= len(r["tokens"]) <= 6 for r in rows)

    greedy = run_cli("generate", f"ckpt={ckpt}", "prompt=The list", "sampler=greedy", "max_new_tokens=12").stdout
    assert greedy.strip() == run_cli("generate", f"ckpt={ckpt}", "prompt=The list", "temperature=0",
                                     "max_new_tokens=12").stdout.strip()


def test_generate_says_which_decoding_path_it_takes(tiny_run: Path):
    """The CPU default is the one precision rule's dtype (bf16 on CPUs with AMX/AVX512-BF16, else fp32) with the
    dynamic cache, eager; the static cache gives the same greedy text, and int8 weights with the compiled step run
    (their agreement with fp32: tests/test_decoding.py)."""
    import torch

    from xlab.device import auto_precision

    dtype = auto_precision(torch.device("cpu"))
    ckpt = tiny_run / "checkpoints" / "last"
    args = [f"ckpt={ckpt}", "prompt=The list", "sampler=greedy", "max_new_tokens=12", "output=jsonl"]
    default = run_cli("generate", *args)
    assert f"decoding: {dtype} on cpu, dynamic KV cache, eager steps" in default.stderr
    static = run_cli("generate", *args, "cache=static")
    assert f"decoding: {dtype} on cpu, static KV cache, eager steps" in static.stderr
    assert static.stdout == default.stdout
    fast = run_cli("generate", *args, "dtype=int8", "compile=on")
    assert "decoding: int8 on cpu, static KV cache, compiled one-token step" in fast.stderr
    assert "decoding eagerly" not in fast.stderr  # the compile did not fall back
    assert 1 <= len(json.loads(fast.stdout)["tokens"]) <= 12


def test_generate_with_a_draft_gives_the_targets_greedy_text(tiny_run: Path):
    """Speculative decoding through the CLI (its exactness on other drafts and for sampling:
    tests/test_speculative.py); the checkpoint drafting for itself has every draft token accepted."""
    ckpt = tiny_run / "checkpoints" / "last"
    args = [f"ckpt={ckpt}", "prompt=The list", "sampler=greedy", "max_new_tokens=12", "output=jsonl"]
    plain = run_cli("generate", *args)
    spec = run_cli("generate", *args, f"draft={ckpt}", "draft_tokens=3")
    assert f"speculative with draft={ckpt} (3 tokens per target forward)" in spec.stderr
    assert spec.stdout == plain.stdout
    assert re.search(r"speculative: (\d+)/\1 draft tokens accepted \(100%\)", spec.stderr), spec.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prompt="], "the prompt is empty"),
        (["prompt=x", "sampler.top_p=0"], "sampler.top_p=0.0 must be in (0, 1]"),
        (["prompt=x", "sampler=beam", "sampler.num_beams=2", "sampler.num_return_sequences=3"],
         "num_return_sequences=3 must be in [1, num_beams=2]"),
        (["prompt=x", "max_new_tokens=-1"], "max_new_tokens=-1 must be >= 0"),
        (["prompt=x", "sampler=nucleus"], "Could not find 'sampler/nucleus'"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_run: Path, args, expected):
    proc = run_cli("generate", f"ckpt={tiny_run / 'checkpoints' / 'last'}", *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
