"""Document sources and the split every source shares.

A source (`data.name` in configs/data/*.yaml) yields a `datasets.Dataset` with columns `id` and `text`, plus a cheap
fingerprint that names its content in the cache without loading it. Documents are split by a hash of their id, so
the split never depends on row order or on how the corpus is sharded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xlab.config import DataConfig
from xlab.errors import XLabError
from xlab.registry import Registry

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "val", "test", "predict")


@dataclass(frozen=True)
class Source:
    fingerprint: Callable[[DataConfig], str]  # cheap; changes whenever the documents would
    load: Callable[[DataConfig], datasets.Dataset]  # columns: id (str), text (str)


SOURCES: Registry[Source] = Registry("data source")


def check_split_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise XLabError(
            f"data.split_fractions={list(fractions)} must be {len(SPLITS)} non-negative numbers "
            f"({'/'.join(SPLITS)}) summing to 1"
        )
    if fractions[0] == 0 or fractions[1] == 0:
        raise XLabError(f"data.split_fractions={list(fractions)} needs a non-empty train and val split")


def hash_order(ids: Sequence[str], seed: int) -> np.ndarray:
    """A permutation of range(len(ids)) that depends only on the set of ids and the seed."""
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )
    return np.argsort(keys, kind="stable")


def split_indices(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split. Documents are ranked by a seeded hash of their id and cut at the cumulative
    fractions, so split sizes are exact (±1 document) and a document's split never depends on row order."""
    check_split_fractions(fractions)
    order = hash_order(ids, seed)
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(ids)).astype(int)
    return {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLITS)}


def split_dataset(ds: datasets.Dataset, fractions: Sequence[float], seed: int) -> dict[str, datasets.Dataset]:
    return {name: ds.select(idx) for name, idx in split_indices(ds["id"], fractions, seed).items()}


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
