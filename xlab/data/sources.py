"""Document sources and the split every source shares.

A source (`data.name` in configs/data/*.yaml) yields a `datasets.Dataset` or `datasets.IterableDataset` with columns
`id` and `text`, plus a cheap fingerprint that names its content in the cache without loading it. Preparation reads
every source the same way: Arrow batches in a fixed order (`document_batches`), so a 20 GB corpus streams through
bounded memory.

Documents are split by a seeded hash of their id: ranked by hash, cut at the cumulative fractions. The split never
depends on row order or on how the corpus is sharded, and split sizes are exact (±1 document).
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xlab.data.config import DataConfig
from xlab.errors import XLabError
from xlab.registry import Registry

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

    AnyDataset = datasets.Dataset | datasets.IterableDataset

SPLITS = ("train", "val", "test", "predict")
READ_BATCH = 1000  # documents per Arrow batch read from a source; fixed, so shard boundaries never depend on it


@dataclass(frozen=True)
class Source:
    fingerprint: Callable[[DataConfig], str]  # cheap; changes whenever the documents would
    # (cfg, ids_only) -> dataset with columns id (str) and, unless ids_only, text (str). ids_only lets a source skip
    # reading the text (a column projection on parquet), which makes the first pass over a big corpus cheap.
    load: Callable[[DataConfig, bool], AnyDataset]
    # cheap checks of the source's files (columns, their types) that train runs before Hydra writes the run dir
    check: Callable[[DataConfig], None] | None = None


SOURCES: Registry[Source] = Registry("data source")


def check_source(data: DataConfig) -> None:
    source = SOURCES.get(data.name)
    if source.check is not None:
        source.check(data)


def check_split_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise XLabError(
            f"data.split_fractions={list(fractions)} must be {len(SPLITS)} non-negative numbers "
            f"({'/'.join(SPLITS)}) summing to 1"
        )
    if fractions[0] == 0 or fractions[1] == 0:
        raise XLabError(f"data.split_fractions={list(fractions)} needs a non-empty train and val split")


def hash_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """A uint64 per id that depends only on the id and the seed."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def split_thresholds(keys: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """The hash key at which each split after the first begins: the keys of the documents ranked at the cumulative
    fractions. With these, one document's split is known from its key alone (`assign_splits`), which lets a stream
    be routed to splits batch by batch."""
    check_split_fractions(fractions)
    n = len(keys)
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(np.int64)[1:-1]
    ordered = np.sort(keys)
    sentinel = np.iinfo(np.uint64).max
    return np.array([ordered[b] if b < n else sentinel for b in bounds], dtype=np.uint64)


def assign_splits(keys: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index into SPLITS of each key (uint8)."""
    return np.searchsorted(thresholds, keys, side="right").astype(np.uint8)


def split_indices(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of each split, in row order. Documents are ranked by a seeded hash of their id and cut at the
    cumulative fractions, so split sizes are exact (±1 document) and a document's split never depends on row order."""
    keys = hash_keys(ids, seed)
    assigned = assign_splits(keys, split_thresholds(keys, fractions))
    return {name: np.flatnonzero(assigned == i) for i, name in enumerate(SPLITS)}


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def document_batches(
    ds: AnyDataset, max_documents: int | None = None, skip: int = 0, batch_size: int | None = None
) -> Iterator[pa.Table]:
    """Arrow tables of consecutive documents in the source's fixed order, the first `skip` left out and at most
    `max_documents` read. Arrow tables avoid a Python dict per row; reading stays sequential for parquet."""
    seen = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_size or READ_BATCH):
        if max_documents is not None and seen + table.num_rows > max_documents:
            table = table.slice(0, max_documents - seen)
        start, seen = seen, seen + table.num_rows
        if seen > skip:
            yield table.slice(max(0, skip - start)) if skip > start else table
        if max_documents is not None and seen >= max_documents:
            return


def column(table: pa.Table, name: str) -> list[str]:
    return table.column(name).to_pylist()


def document_texts(table: pa.Table) -> pa.ChunkedArray:
    """The text of each document of a batch: `title + "\\n\\n" + text` when the source has titles; a missing
    text is empty. Arrow compute keeps this out of Python's per-row loop."""
    import pyarrow.compute as pc  # pyarrow: 0.3 s of start-up, for the data stage only

    text = pc.fill_null(table.column("text"), "")
    if "title" in table.column_names:
        text = pc.binary_join_element_wise(pc.fill_null(table.column("title"), ""), text, "\n\n")
    return text


def check_data_config(data: DataConfig) -> None:
    SOURCES.get(data.name)
    check_split_fractions(data.split_fractions)  # the other numbers: by the schema (xlab/schema.py)


# ---- helpers for sources that read local files -----------------------------------------------------------------


def resolve_files(pattern: str | None, key: str, suffixes: Sequence[str]) -> list[Path]:
    """The files a glob names (`**` recurses; a directory means every file below it), sorted so the order is the
    same on every machine, each real file once; a one-line error if none match or some have an unsupported
    suffix."""
    if not pattern:
        raise XLabError(f"{key} is not set; give a glob of {'/'.join(suffixes)} files, e.g. {key}='corpus/*.txt'")
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    files = _distinct(sorted(Path(p) for p in _glob_files(pattern, set())))
    if not files:
        raise XLabError(f"no files match {key}={pattern!r}")
    bad = [f for f in files if f.suffix.lower() not in suffixes]
    if bad:
        raise XLabError(f"{key} matches {str(bad[0])!r}, which is not one of {', '.join(suffixes)}")
    return files


def _glob_files(pattern: str, seen: set[tuple[int, int]]) -> list[str]:
    """glob.glob(pattern, recursive=True)'s files, except that `**` enters each real directory once (`seen`: their
    device and inode): through a symlink loop glob lists the same files again at every depth the OS allows."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return [p for p in glob.glob(pattern) if os.path.isfile(p)]
    i = parts.index("**")
    head, tail = os.sep.join(parts[:i]) or (os.sep if pattern.startswith(os.sep) else "."), os.sep.join(parts[i + 1:])
    roots = [d for d in glob.glob(head) if os.path.isdir(d)] if glob.has_magic(head) else [head]
    found = []
    for root in roots:
        for top, dirs, names in os.walk(root, followlinks=True):
            stat = os.stat(top)
            if (stat.st_dev, stat.st_ino) in seen:
                dirs.clear()
                continue
            seen.add((stat.st_dev, stat.st_ino))
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # `**` skips hidden directories, as glob does
            if tail:
                found += _glob_files(os.path.join(glob.escape(top), tail), seen)
            else:
                found += [os.path.join(top, n) for n in names if not n.startswith(".")]
    return [f for f in found if os.path.isfile(f)]


def _distinct(files: list[Path]) -> list[Path]:
    """One path per real file: a file reached through links (or hard-linked twice) is one source of documents, so
    no document reaches two splits under two ids. Its own path wins over a linked one, else the first in order."""
    chosen: dict[tuple[int, int], Path] = {}
    for f in files:
        stat = f.stat()
        key = (stat.st_dev, stat.st_ino)
        if key not in chosen or (_unlinked(f) and not _unlinked(chosen[key])):
            chosen[key] = f
    return sorted(chosen.values())


def _unlinked(path: Path) -> bool:
    return os.path.realpath(path) == os.path.abspath(path)


def check_text_columns(path: Path | str, schema: Any, cfg: DataConfig) -> None:
    """The text and title columns of a parquet file (its pyarrow schema) must hold strings: a number would become
    text silently, or break tokenization far from its cause."""
    import pyarrow as pa  # pyarrow: 0.3 s of start-up, for the data stage only

    for key in ("text_column", "title_column"):
        name = getattr(cfg, key)
        if name and name in schema.names:
            kind = schema.field(name).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise XLabError(f"data.{key}={name!r} in {str(path)!r} holds {kind}, not text; name a string column")


def files_fingerprint(files: Sequence[Path]) -> str:
    """Names the content of local files by path, size, inode, and modification and change times, not by a hash of
    their bytes (hashing 20 GB would take minutes at every start). The change time (ctime) is what catches an edit
    that keeps size and mtime (`touch -r`, `cp -p`, `rsync -t`): the system sets it on every write, and no tool can
    set it back. It also moves on chmod/chown/rename, which costs one needless re-tokenization. Not seen: an edit
    that keeps the size within the timestamp granularity of a coarse file system (1-2 s on FAT or some network
    mounts) after the corpus was prepared; remove the token cache entry then (docs/data.md)."""
    stats = [(str(f.resolve()), f.stat()) for f in files]
    return fingerprint([(path, s.st_size, s.st_ino, s.st_mtime_ns, s.st_ctime_ns) for path, s in stats])
