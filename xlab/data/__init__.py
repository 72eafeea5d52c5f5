"""Data: document sources (registry SOURCES), tokenizer/shard preparation, and XLabDataModule."""

from xlab.data import pydocs  # noqa: F401  (registers the source)
from xlab.data.sources import SOURCES, SPLITS

__all__ = ["SOURCES", "SPLITS"]
