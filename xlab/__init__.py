"""XLab: train and sample transformer language models with Hydra configs and Accelerate.

The Python API: `from xlab import XLabModel, XLabDataModule` (xlab/models, xlab/data), and decoding in
`xlab.inference` (generate, sample, load_for_decoding; xlab/generation/api.py). The README's paths
(`xlab.models`, `xlab.datamodules`) name the same objects.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["XLabDataModule", "XLabModel"]
_HOMES = {"XLabModel": "xlab.models.transformer", "XLabDataModule": "xlab.data.datamodule"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:  # resolved on first use: `import xlab.cli`, every command's first import, needs no torch
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'xlab' has no attribute {name!r}")
