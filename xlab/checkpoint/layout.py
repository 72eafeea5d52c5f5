"""A checkpoint directory's file names, resolving a path to one (following `last`), and which are complete."""


from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import TYPE_CHECKING

from xlab.errors import XLabError
from xlab.fsio import contained

if TYPE_CHECKING:

    pass

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
STATE = "state.json"
EXPORT_FILES = (WEIGHTS, TOKENIZER, CONFIG)
SHARDED_DIR = "sharded"  # FSDP runs: model and optimizer shards (torch.distributed.checkpoint)
# What xlab.evaluate and xlab.generate write into a checkpoint: replaced on write (fsio.write_file), never read, so a
# symlink there is no reason to refuse the checkpoint.
OUTPUTS = ("eval_*.json", "samples_*.jsonl", "samples_*.md")


def resolve_checkpoint(path: str | Path) -> Path:
    """The real directory behind a checkpoint/export path (following `last`), or a one-line error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise XLabError(f"checkpoint path {str(path)!r} does not exist")
    p = p.resolve()
    for name in EXPORT_FILES:
        if not (p / name).is_file():
            expected = ", ".join(EXPORT_FILES)
            raise XLabError(f"{str(path)!r} is not a checkpoint: {name} is missing (expected {expected})")
    check_links(p)
    return p


def check_links(ckpt: Path) -> None:
    """Refuse a checkpoint holding a symlink that leads out of it, at any depth (an FSDP run's sharded/ state is a
    subdirectory), naming the link; links between its own files are fine."""
    for root, dirs, files in os.walk(ckpt):  # a linked directory is listed, not entered
        for name in dirs + files:
            rel = (Path(root) / name).relative_to(ckpt)
            if (ckpt / rel).is_symlink() and not (root == str(ckpt) and any(fnmatch.fnmatch(name, o) for o in OUTPUTS)):
                contained(ckpt, rel)


def is_complete(path: Path) -> bool:
    """Whether `path` is a directory with every file a training checkpoint has (ours; Accelerate's vary)."""
    return path.is_dir() and all((path / name).is_file() for name in (*EXPORT_FILES, STATE))


def newest_checkpoint(root: Path) -> Path | None:
    """The complete step_N directory with the highest N under `root`, or None."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("step_*") if p.name[5:].isdigit() and is_complete(p)]
    return max(found)[1] if found else None










































