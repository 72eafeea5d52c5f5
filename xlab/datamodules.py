"""The seed's import path: `from xlab.datamodules import XLabDataModule`."""

from xlab.data.datamodule import XLabDataModule

__all__ = ["XLabDataModule"]
