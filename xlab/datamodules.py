"""The README's import path for the data module: `from xlab.datamodules import XLabDataModule` (the code lives in
xlab/data/datamodule.py)."""

from xlab.data.datamodule import XLabDataModule

__all__ = ["XLabDataModule"]
