"""lm-evaluation-harness on XLab checkpoints (xlab/evaluation/harness.py, tasks/): lm-eval's real task machinery on the
shipped local task, offline. XLabLM's log-likelihoods equal a direct computation with the model; the same task on a
format=hf export through lm-eval's own HF wrapper gives the same accuracy; the CLI writes eval_tasks.json; a task
that is unknown or cannot be fetched offline fails in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import run_cli  # noqa: E402
from test_bad_inputs import fails_in_one_line_in_process  # noqa: E402

from xlab.datamodules import XLabDataModule  # noqa: E402
from xlab.evaluation.tasks import CLOZE, CONTINUATION, NUM_CHOICES, ContinuationSpec, write_local_tasks  # noqa: E402
from xlab.models import XLabModel  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run's checkpoint: the CLI test writes eval_tasks.json into it."""
    out = tmp_path_factory.mktemp("harness") / "ckpt"
    shutil.copytree((tiny_run / "checkpoints" / "last").resolve(), out)
    return out


@pytest.fixture(scope="module")
def setup(ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    from lm_eval.tasks import TaskManager

    model = XLabModel.load_from_checkpoint(ckpt).eval()
    datamodule = XLabDataModule.load_from_checkpoint(ckpt)
    spec = ContinuationSpec(num_docs=24).fitted(model.max_len)  # 24 items: 96 requests, each also scored directly
    task_dir = write_local_tasks(datamodule, tmp_path_factory.mktemp("tasks"), spec)
    return model, datamodule.tokenizer, TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def xlab_results(setup):
    from xlab.evaluation.harness import XLabLM, run_tasks

    model, tok, manager = setup
    return run_tasks(XLabLM(model, tok, batch_size=4), [CONTINUATION], manager, log_samples=True)


@torch.no_grad()
def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | <sos> context) from one unbatched forward, tokenized by lm-eval's documented rule: the
    context alone, then the whole text's tokens past the context's length (the context's trailing spaces go to the
    continuation). Where BPE merges across the boundary the sequence is not the whole text's own tokens."""
    n = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - n], context[len(context) - n:] + continuation
    ctx = [tok.sos_id, *tok.encode(context)]
    cont = [tok.sos_id, *tok.encode(context + continuation)][len(ctx):]
    seq = ctx + cont
    assert len(seq) <= model.max_len + 1
    logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].float(), dim=-1)
    return float(logp[len(ctx) - 1:].gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihoods_equal_a_direct_computation(setup, xlab_results):
    model, tok, _ = setup
    samples = xlab_results["samples"][CONTINUATION]
    assert len(samples) >= NUM_CHOICES
    for sample in samples:
        assert len(sample["arguments"]) == NUM_CHOICES
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            score, _greedy = resp[0]
            assert abs(score - direct_loglikelihood(model, tok, context, continuation)) <= TOL


def test_rolling_and_generation(setup):
    from lm_eval.api.instance import Instance

    from xlab.evaluation.harness import XLabLM
    from xlab.inference import generate

    model, tok, _ = setup
    lm = XLabLM(model, tok, batch_size=2)
    text = "def f(x):\n    return x + 1\n" * 12  # longer than max_len: several windows
    ids = tok.encode(text)
    assert len(ids) > model.max_len
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # each token scored once; a token of chunk c (max_len tokens each) sees the max_len tokens before chunk c's end
    with torch.no_grad():
        seq, total, L = [tok.sos_id, *ids], 0.0, model.max_len
        for start in range(0, len(ids), L):
            end = min(start + L, len(ids))
            window = seq[max(0, end - L): end]  # inputs: seq[i] predicts ids[i]
            logp = torch.log_softmax(model(torch.tensor([window]))[0], -1)
            offset = max(0, end - L)
            total += sum(float(logp[i - offset, ids[i]]) for i in range(start, end))
    assert abs(rolling - total) <= 1e-4
    requests = [Instance("generate_until", {}, ("The list", {"until": ["\n"], "max_gen_toks": 8}), 0),
                Instance("generate_until", {}, ("A dict", {"until": [")"], "max_gen_toks": 5}), 1)]
    got = lm.generate_until(requests)
    want = [generate(model, tok, "The list", "greedy", 8, stop=["\n"])[0].text,
            generate(model, tok, "A dict", "greedy", 5, stop=[")"])[0].text]
    assert got == want


def test_hf_export_through_lm_evals_hf_wrapper_scores_the_same(ckpt, setup, xlab_results, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from xlab.evaluation.harness import run_tasks
    from xlab.models.hf import export_hf

    out = export_hf(ckpt, tmp_path / "hf")  # what `python -m xlab.export format=hf` runs (tested in test_hf_interop)
    # lm-eval's defaults: the export's tokenizer leads each text with <sos> by itself, as XLabLM does
    hf = HFLM(pretrained=str(out), batch_size=4, device="cpu", dtype="float32")
    hf_results = run_tasks(hf, [CONTINUATION], setup[2], log_samples=True)
    ours, theirs = xlab_results["results"][CONTINUATION], hf_results["results"][CONTINUATION]
    assert ours["acc,none"] == theirs["acc,none"]
    assert ours["acc_norm,none"] == theirs["acc_norm,none"]
    for a, b in zip(xlab_results["samples"][CONTINUATION], hf_results["samples"][CONTINUATION]):
        assert a["arguments"] == b["arguments"]
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)


def test_cli_writes_eval_tasks_json_and_results_shows_it(ckpt: Path, tmp_path: Path):
    proc = run_cli("evaluate", f"ckpt={ckpt}", f"tasks=[{CONTINUATION},{CLOZE}]", "limit=6", "num_fewshot=1",
                   "batch_size=4")
    assert f"|{CONTINUATION}|" in proc.stdout and f"|{CLOZE}" in proc.stdout
    record = json.loads((ckpt / "eval_tasks.json").read_text())
    from xlab.device import task_precision

    assert record["precision"] == task_precision("auto", torch.device("cpu"))  # auto, as scored here
    rows = {(row["task"], row["metric"]): row for row in record["rows"]}
    assert set(rows) == {(CONTINUATION, "acc"), (CONTINUATION, "acc_norm"), (CLOZE, "acc"), (CLOZE, "perplexity")}
    for (_, metric), row in rows.items():
        assert row["num_fewshot"] == 1 and row["limit"] == 6 and row["stderr"] is not None
        assert 0.0 <= row["value"] <= 1.0 or metric == "perplexity" and row["value"] > 1
        assert row["lm_eval_version"] == record["lm_eval_version"]

    run = tmp_path / "run"  # a run dir whose last checkpoint is this one: xlab.results adds the task columns
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last").symlink_to(ckpt)
    (run / "metrics.jsonl").write_text("")
    table = run_cli("results", str(run)).stdout
    header, _, row = table.splitlines()[:3]
    cells = dict(zip(header.split("|"), row.split("|")))
    acc = rows[(CONTINUATION, "acc")]
    assert cells[f" {CONTINUATION} acc "] == f" {acc['value']:.3f} ± {acc['stderr']:.3f} "
    (ckpt / "eval_tasks.json").write_text('{"rows": [{"task": 1}]}')  # damaged: one line, no traceback
    proc = run_cli("results", str(run), check=False)
    assert proc.returncode == 2 and "eval_tasks.json is damaged (KeyError" in proc.stderr


@pytest.mark.parametrize("name, expect", [("no_such_task", "unknown to lm-eval"),
                                          ("hellaswag", "task 'hellaswag' cannot be loaded here")])
def test_unknown_or_unreachable_task_fails_in_one_line(name, expect, ckpt: Path, capsys, monkeypatch):
    fails_in_one_line_in_process("evaluate", f"ckpt={ckpt}", f"tasks=[{name}]", expect=expect, capsys=capsys,
                                 monkeypatch=monkeypatch)


@pytest.mark.parametrize("args, expect", [
    (["limit=0"], "limit=0 must be >= 1"),
    (["num_fewshot=-1"], "num_fewshot=-1 must be >= 0"),
    (["precision=fp16"], "precision='fp16' is not supported with tasks="),
    (["task_path=/no/such/dir"], "task_path='/no/such/dir' is not a directory"),
])
def test_bad_task_options_fail_in_one_line(args, expect, ckpt: Path, capsys, monkeypatch):
    fails_in_one_line_in_process("evaluate", f"ckpt={ckpt}", f"tasks=[{CONTINUATION}]", *args, expect=expect,
                                 capsys=capsys, monkeypatch=monkeypatch)


def run_benchmark(*args: str) -> str:
    """benchmarks/harness.py at a toy size: here, beside the trained checkpoint this file builds anyway."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "harness.py"
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_harness_benchmark_compares_xlablm_with_hflm(tiny_run: Path):
    out = run_benchmark("--ckpt", str(tiny_run / "checkpoints" / "last"), "--limit", "8", "--repeats", "1",
                        "--precision", "fp32")
    number = r"[\d,.]+"
    assert re.search(rf"\| fp32 \| {number} \| {number} \| \*\*{number}\*\* \|", out), out
    assert "32 loglikelihood requests" in out, out


def test_auto_precision_is_bf16_where_fast(monkeypatch):
    import xlab.device
    from xlab.device import task_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(xlab.device, "cpu_has_fast_bf16", lambda: True)
    assert task_precision("auto", cpu) == "bf16" and task_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(xlab.device, "cpu_has_fast_bf16", lambda: False)
    assert task_precision("auto", cpu) == "fp32" and task_precision("bf16", cpu) == "bf16"


def test_cloze_items_are_a_passage_and_its_next_whole_word(ckpt: Path, tmp_path: Path):
    from xlab.evaluation.tasks import CLOZE_WORD, document_windows

    datamodule = XLabDataModule.load_from_checkpoint(ckpt)
    spec = ContinuationSpec(num_docs=40).fitted(64)
    items = [json.loads(line) for line in (write_local_tasks(datamodule, tmp_path, spec) / f"{CLOZE}.jsonl")
             .read_text().splitlines()]
    windows = dict(enumerate(document_windows(datamodule.tokens("predict"), datamodule.tokenizer, spec)))
    assert len(items) >= 20
    for item in items:
        text = datamodule.tokenizer.decode(windows[item["id"]][1])
        assert re.fullmatch(r" [A-Za-z]{3,}", item["target"]) and text.startswith(item["context"] + item["target"])
        rest = text[len(item["context"]) + len(item["target"]):]
        assert rest and not rest[0].isalpha()  # a whole word: the window did not cut it
        assert len(item["context"]) >= len(text) // 2 and not CLOZE_WORD.search(rest)  # the window's last such word
