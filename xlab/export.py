"""`python -m xlab.export ckpt=PATH out=DIR [format=xlab|hf]`.

format=xlab: weights, tokenizer and config only (no optimizer state). format=hf: a transformers model directory
(GPT-2, Llama or Qwen3 class, whichever computes exactly the same function) with its tokenizer files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from xlab.checkpoint.layout import EXPORT_FILES
from xlab.checkpoint.read import Checkpoint
from xlab.cli import hydra_app
from xlab.data.config import DataConfig, TokenizerConfig
from xlab.data.tokenizer import load_tokenizer
from xlab.errors import XLabError, check_writable_dir
from xlab.fsio import opened_inside
from xlab.models.config import ModelConfig
from xlab.schema import Choice, Schema


class ExportFormat(Choice):
    xlab = "xlab"  # model.safetensors + tokenizer.json + config.yaml
    hf = "hf"  # a transformers model directory


@dataclass
class ExportConfig(Schema):
    ckpt: str = MISSING
    out: str | None = None  # None = <checkpoint dir>-export (xlab) or <checkpoint dir>-hf (hf)
    format: ExportFormat = ExportFormat.xlab


def export_checkpoint(path: str | Path | Checkpoint, out: str | Path) -> Path:
    """Copy the weights, tokenizer and config (no optimizer state) into `out`."""
    ckpt = Checkpoint.of(path)
    load_tokenizer(ckpt)  # refuse a tokenizer that does not fit the weights before writing anything
    for group, schema in (("model", ModelConfig), ("data", DataConfig), ("tokenizer", TokenizerConfig)):
        ckpt.section(group, schema)  # an export must load: refuse to copy a damaged config.yaml
    check_writable_dir(out, "out")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise XLabError(f"export directory {str(out)!r} exists and is not empty; choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        with opened_inside(ckpt.path, name) as src:
            shutil.copyfile(src, out / name)
    return out


def task(cfg: ExportConfig) -> str:
    ckpt = Checkpoint(cfg.ckpt)
    if cfg.format is ExportFormat.hf:
        from xlab.models.hf import export_hf  # transformers: only for this format

        out = export_hf(ckpt, cfg.out or f"{ckpt}-hf")
    else:
        out = export_checkpoint(ckpt, cfg.out or f"{ckpt}-export")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {ckpt} -> {out} ({size / 1e6:.2f} MB)")
    return str(out)


main = hydra_app("export", task, ExportConfig)

if __name__ == "__main__":
    main()
