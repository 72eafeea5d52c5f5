"""`python -m xlab.evaluate ckpt=PATH split=val|test`: loss, bits per byte, accuracy, perplexity of a checkpoint on
a split.

Prints a small table and writes eval_<split>.json into the checkpoint directory.
`python -m xlab.evaluate ckpt=PATH tasks=[xlab_continuation] limit=N num_fewshot=K` runs lm-evaluation-harness
tasks on the checkpoint instead (xlab/harness.py), prints lm-eval's table and writes eval_tasks.json there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:
    import torch

from xlab.cli import hydra_app

DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(name: str):
    """The torch device `device=` names (auto: cuda when there is one, else cpu), or one line saying why it cannot
    be used here."""
    import torch

    from xlab.errors import XLabError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):  # torch's own message lists every backend it was built to know
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise XLabError(f"device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise XLabError(f"device={name!r}: there is no CUDA device here (torch.cuda.is_available() is False); "
                        "use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise XLabError(f"device={name!r}: there are only {torch.cuda.device_count()} CUDA devices here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise XLabError(f"device={name!r}: MPS is not available here; use device=cpu or device=auto")
    return dev


def validate(cfg: DictConfig) -> None:
    """The schema's checks (xlab/config.py) and the device, before any work."""
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    config = OmegaConf.to_object(cfg)
    pick_device(config.device)
    if config.tasks:
        task_precision(str(config.precision))


def score_checkpoint(ckpt: Path, split: str, batch_size: int = 8, max_batches: int | None = None,
                     precision: str = "auto", device: str = "auto", cache_dir: str | None = None) -> dict:
    """Evaluate a checkpoint on a split (every window, or max_batches batches) and write eval_<split>.json beside
    its weights; the result dict."""
    import torch

    from xlab.checkpoint import resolve_checkpoint
    from xlab.config import EvaluateConfig
    from xlab.datamodules import XLabDataModule
    from xlab.errors import XLabError
    from xlab.evaluation import evaluate
    from xlab.fsio import write_file
    from xlab.models import XLabModel
    from xlab.precision import autocast_for, resolve_precision

    # the schema checks the numbers and choices (the command line's arrive checked already)
    EvaluateConfig(str(ckpt), split, batch_size, max_batches, precision, device)
    ckpt = resolve_checkpoint(ckpt)
    dev = pick_device(device)
    model = XLabModel.load_from_checkpoint(ckpt, map_location=dev)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cache_dir)
    windows = datamodule.eval_windows(split, model.max_len, batch_size, max_batches)
    byte_lengths = torch.as_tensor(datamodule.tokenizer.byte_lengths(), device=dev)
    result = evaluate(model, windows, dev, autocast_for(dev, resolve_precision(precision)), byte_lengths=byte_lengths)
    out = ckpt / f"eval_{split}.json"
    try:
        write_file(out, json.dumps(result, indent=2))  # replaces a symlink there instead of writing through it
    except OSError as exc:
        raise XLabError(f"cannot write {out}: {exc}") from None
    return result


def task_precision(precision: str, device: torch.device | None = None) -> str:
    """Precision of harness scoring: auto is bf16 where the hardware runs it fast (training's rule: CUDA with bf16,
    CPUs with AMX/AVX512-BF16), else fp32; fp16 is refused (lm-eval's log-likelihoods overflow it)."""
    import torch

    from xlab.errors import XLabError
    from xlab.precision import cpu_has_fast_bf16

    if precision == "auto":
        if device is not None and device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device is not None and device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision in ("fp32", "bf16"):
        return precision
    raise XLabError(f"precision={precision!r} is not supported with tasks=; valid: auto (bf16 where fast, else "
                    "fp32), fp32, bf16")


def run_tasks(cfg: DictConfig) -> dict:
    """tasks=[...]: lm-evaluation-harness on the checkpoint; prints lm-eval's table."""
    from xlab.errors import XLabError

    try:
        from lm_eval.utils import make_table

        from xlab.harness import score_tasks
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


def task(cfg: DictConfig) -> dict:
    from xlab.checkpoint import resolve_checkpoint

    if cfg.tasks:
        return run_tasks(cfg)
    ckpt = resolve_checkpoint(cfg.ckpt)
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


main = hydra_app("evaluate", task, validate)

if __name__ == "__main__":
    main()
