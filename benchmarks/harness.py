"""lm-eval `loglikelihood` throughput: XLab's wrapper (evaluation.harness.XLabLM) vs lm-eval's HF wrapper (HFLM) on a
`format=hf` export of the same checkpoint, on the local `xlab_continuation` task (issue 17).

The task is built from the checkpoint's predict split as score_tasks builds it; its loglikelihood requests are
collected once (lm-eval's task.build_all_requests) and both wrappers score that same list at the same batch size.
Per precision: one warm-up call each, then --repeats rounds taking turns; each figure is the median of its rounds.
tokens/s counts context + continuation tokens (<sos> included) of every request. fp32 log-likelihoods of the two
wrappers must agree within 1e-4 (bf16 ones are only reported).

    python benchmarks/harness.py --ckpt /tmp/spec/target/checkpoints/last --precision fp32 bf16
    python benchmarks/harness.py --ckpt RUN/checkpoints/last --limit 8 --repeats 1 --precision fp32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TOL = 1e-4


def load(ckpt: str, out: Path):
    """(XLab model, tokenizer, the task's loglikelihood Instances, HF export dir) for a checkpoint."""
    from lm_eval.tasks import TaskManager

    from xlab.checkpoint.layout import resolve_checkpoint
    from xlab.datamodules import XLabDataModule
    from xlab.evaluation.tasks import CONTINUATION, ContinuationSpec, write_local_tasks
    from xlab.models import XLabModel
    from xlab.models.hf import export_hf

    path = resolve_checkpoint(ckpt)
    model = XLabModel.load_from_checkpoint(path, map_location=torch.device("cpu")).eval()
    datamodule = XLabDataModule.load_from_checkpoint(path)
    spec = ContinuationSpec().fitted(model.max_len)
    task_dir = write_local_tasks(datamodule, out / "tasks", spec)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return model, datamodule.tokenizer, manager, export_hf(path, out / "hf"), CONTINUATION


def requests_of(manager, name: str, limit: int | None) -> list:
    """The task's loglikelihood Instances, built once."""
    task = manager.load([name])["tasks"][name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    if not requests:
        raise SystemExit(f"{name} built no loglikelihood requests")
    return requests


def timed(lm, requests) -> tuple[float, list[float]]:
    """(seconds, per-request log-likelihoods) of one lm.loglikelihood call."""
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [score for score, _ in out]


def bench(lms: dict, requests, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per wrapper over `repeats` rounds taking turns, after one warm-up each; and their scores."""
    scores = {name: timed(lm, requests)[1] for name, lm in lms.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in lms}
    for _ in range(repeats):
        for name, lm in lms.items():
            seconds, got = timed(lm, requests)
            times[name].append(seconds)
            scores[name] = got
    return {name: statistics.median(t) for name, t in times.items()}, scores


def run_precision(precision: str, model, tok, hf_dir: Path, requests, args) -> dict:
    """One table row's figures for a precision."""
    from lm_eval.models.huggingface import HFLM

    from xlab.evaluation.harness import XLabLM

    xlab = XLabLM(copy.deepcopy(model), tok, batch_size=args.batch_size, precision=precision)  # bf16 casts it
    hf = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device="cpu",
              dtype=DTYPES[precision])
    tokens = sum(len(ctx) + len(cont) for ctx, cont in (xlab._encode_pair(*r.args) for r in requests))
    seconds, scores = bench({"XLabLM": xlab, "HFLM": hf}, requests, args.repeats)
    diff = max(abs(a - b) for a, b in zip(scores["XLabLM"], scores["HFLM"]))
    if precision == "fp32" and diff > TOL:
        raise SystemExit(f"fp32 log-likelihoods differ by {diff:.2e} > {TOL} between XLabLM and HFLM")
    row = {"precision": precision, "diff": diff, "tokens": tokens}
    for name, s in seconds.items():
        row[name] = (len(requests) / s, tokens / s)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="an XLab checkpoint dir (or run dir)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="task items at most (4 requests each)")
    parser.add_argument("--precision", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    args = parser.parse_args()
    import lm_eval
    import transformers

    with tempfile.TemporaryDirectory(prefix="xlab_harness_bench_") as tmp:
        model, tok, manager, hf_dir, name = load(args.ckpt, Path(tmp))
        requests = requests_of(manager, name, args.limit)
        rows = [run_precision(p, model, tok, hf_dir, requests, args) for p in args.precision]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# {platform.machine()} {platform.processor() or platform.platform()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, "
          f"{datetime.date.today()}; {params:.1f}M params, {name}: {len(requests)} loglikelihood requests "
          f"({rows[0]['tokens']} tokens), batch {args.batch_size}, median of {args.repeats}")
    print("| precision | XLabLM req/s | HFLM req/s | XLab/HF |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['precision']} | {row['XLabLM'][0]:,.1f} | {row['HFLM'][0]:,.1f} | "
              f"**{row['XLabLM'][0] / row['HFLM'][0]:.2f}** |")
    for row in rows:
        print(f"- {row['precision']}: tokens/s XLabLM {row['XLabLM'][1]:,.0f}, HFLM {row['HFLM'][1]:,.0f}; "
              f"max |log-likelihood difference| {row['diff']:.1e}")


if __name__ == "__main__":
    main()
