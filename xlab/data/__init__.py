"""Data: document sources (registry SOURCES), tokenizer/shard preparation, and XLabDataModule."""

from xlab.data import pydocs, text_files, wikipedia  # noqa: F401  (register the sources)
from xlab.data.sources import SOURCES, SPLITS

__all__ = ["SOURCES", "SPLITS"]
