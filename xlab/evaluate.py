"""`python -m xlab.evaluate ckpt=PATH split=val|test`: loss, bits per byte, accuracy, perplexity of a checkpoint on
a split.

Prints a small table and writes eval_<split>.json into the checkpoint directory.
`python -m xlab.evaluate ckpt=PATH tasks=[xlab_continuation] limit=N num_fewshot=K` runs lm-evaluation-harness
tasks on the checkpoint instead (xlab/evaluation/harness.py), prints lm-eval's table and writes eval_tasks.json
there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING, DictConfig

from xlab.checkpoint.read import Checkpoint
from xlab.cli import hydra_app, typed
from xlab.data.config import Split
from xlab.device import pick_device, task_precision
from xlab.errors import XLabError
from xlab.evaluation.windows import score_checkpoint
from xlab.schema import AT_LEAST_1, NON_NEGATIVE, PathsConfig, Precision, Range, Schema


@dataclass
class EvaluateConfig(Schema):
    ckpt: str = MISSING
    split: Split = Split.val
    batch_size: int = 8
    max_batches: int | None = None  # None = the whole split
    precision: Precision = Precision.auto
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    paths: PathsConfig = field(default_factory=PathsConfig)
    # lm-evaluation-harness tasks (xlab/evaluation/harness.py): empty = the split's loss and bits per byte above.
    # Local tasks (xlab/evaluation/tasks: xlab_continuation, xlab_cloze) are built from the checkpoint's predict split;
    # lm-eval's own need their data.
    # With tasks, precision auto is bf16 where the device runs it fast, else fp32 (exact log-likelihoods).
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # documents per task; None = all
    num_fewshot: int = 0
    task_path: str | None = None  # a folder of your own lm-eval task YAMLs (e.g. over local JSON/JSONL files)

    LIMITS = {"batch_size": AT_LEAST_1, "max_batches": Range(1, note="(or null: the whole split)"),
              "limit": Range(1, note="(or null: every document)"), "num_fewshot": NON_NEGATIVE}


def validate(cfg: DictConfig) -> None:
    """The schema's checks and the device, before any work."""
    config = typed(cfg)
    device = pick_device(config.device)
    if config.tasks:
        task_precision(str(config.precision), device)


def run_tasks(cfg: EvaluateConfig) -> dict:
    """tasks=[...]: lm-evaluation-harness on the checkpoint; prints lm-eval's table."""
    try:
        from lm_eval.utils import make_table  # the optional `eval` extra

        from xlab.evaluation.harness import score_tasks  # lm-eval: the optional `eval` extra
    except ImportError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise XLabError(f"tasks={list(cfg.tasks)} needs lm-evaluation-harness ({exc.name} is missing): "
                        "pip install 'xlab[eval]'") from None
    device = pick_device(cfg.device)
    results, out = score_tasks(cfg.ckpt, list(cfg.tasks), cfg.num_fewshot, cfg.limit, cfg.batch_size,
                               task_precision(str(cfg.precision), device), device, cfg.paths.cache_dir, cfg.task_path)
    print(make_table(results))
    print(f"wrote {out}")
    return results


def task(cfg: EvaluateConfig) -> dict:
    if cfg.tasks:
        return run_tasks(cfg)
    ckpt = Checkpoint(cfg.ckpt)
    result = score_checkpoint(ckpt, str(cfg.split), cfg.batch_size, cfg.max_batches, str(cfg.precision), cfg.device,
                              cfg.paths.cache_dir)
    rows = [("loss", f"{result['loss']:.4f}"), ("bits per byte", f"{result['bits_per_byte']:.4f}"),
            ("accuracy (%)", f"{result['accuracy']:.2f}"), ("perplexity", f"{result['perplexity']:.2f}"),
            ("tokens", f"{result['tokens']}"), ("bytes", f"{result['bytes']}")]
    print(f"{cfg.split} split of {ckpt}")
    for name, value in rows:
        print(f"  {name:<13} {value:>12}")
    print(f"wrote {ckpt / f'eval_{cfg.split}.json'}")
    return result


main = hydra_app("evaluate", task, EvaluateConfig, validate)

if __name__ == "__main__":
    main()
