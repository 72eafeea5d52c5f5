"""`python -m xlab.evaluate ckpt=PATH split=val|test`: loss, accuracy, perplexity of a checkpoint on a split.

Prints a small table and writes eval_<split>.json into the checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from xlab.cli import hydra_app


def pick_device(name: str):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def task(cfg: DictConfig) -> dict:
    from xlab.checkpoint import resolve_checkpoint
    from xlab.datamodules import XLabDataModule
    from xlab.errors import XLabError
    from xlab.evaluation import evaluate
    from xlab.models import XLabModel
    from xlab.precision import autocast_for, resolve_precision

    if cfg.batch_size < 1:
        raise XLabError(f"batch_size={cfg.batch_size} must be >= 1")
    ckpt = resolve_checkpoint(cfg.ckpt)
    device = pick_device(cfg.device)
    model = XLabModel.load_from_checkpoint(ckpt, map_location=device)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cfg.paths.cache_dir)
    windows = datamodule.eval_windows(cfg.split, model.max_len, cfg.batch_size, cfg.max_batches)
    result = evaluate(model, windows, device, autocast_for(device, resolve_precision(cfg.precision)))
    rows = [("loss", f"{result['loss']:.4f}"), ("accuracy (%)", f"{result['accuracy']:.2f}"),
            ("perplexity", f"{result['perplexity']:.2f}"), ("tokens", f"{result['tokens']}")]
    print(f"{cfg.split} split of {ckpt}")
    for name, value in rows:
        print(f"  {name:<13} {value:>12}")
    out = Path(ckpt) / f"eval_{cfg.split}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


main = hydra_app("evaluate", task)

if __name__ == "__main__":
    main()
