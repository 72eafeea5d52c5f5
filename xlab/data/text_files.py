"""`data=text_files data.data_files=GLOB`: your own corpus from local `.txt`, `.jsonl` and `.parquet` files.

- `.txt`: one document per file, its id the file's path below the glob's fixed prefix.
- `.jsonl`: one document per line, text in `data.text_column`.
- `.parquet`: one document per row, text in `data.text_column`.
For jsonl/parquet, `data.id_column` names a stable id field; without one a document's id is its file and row, so
moving rows between files would move documents between splits. `data.title_column`, when set, is prepended.
Files are read in sorted path order, streamed: nothing is held in memory beyond one batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from xlab.data.config import DataConfig
from xlab.data.sources import SOURCES, Source, check_text_columns, files_fingerprint, fingerprint, resolve_files
from xlab.errors import XLabError

if TYPE_CHECKING:
    import datasets

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: ids are paths relative to it."""
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        return Path(pattern)
    fixed = pattern[: min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))]
    return Path(os.path.dirname(fixed) or ".")


def _text(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XLabError(f"{str(path)!r} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise XLabError(f"{str(path)!r} is empty; remove it or change data.data_files")
    return text


def _field(row: dict, key: str, name: str | None, where: str) -> object:
    if name not in row:
        raise XLabError(f"unknown column data.{key}={name!r} in {where}; its columns: {', '.join(map(str, row))}")
    return row[name]


def _jsonl(path: Path, rel: str, cfg: DataConfig) -> Iterator[dict]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{str(path)!r} line {lineno}"
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise XLabError(f"{where} is not a UTF-8 JSON object: {exc}") from None
            if not isinstance(row, dict):
                raise XLabError(f"{where} is not a JSON object")
            text = _field(row, "text_column", cfg.text_column, where)
            if cfg.title_column:
                text = f"{_field(row, 'title_column', cfg.title_column, where)}\n\n{text}"
            doc_id = _field(row, "id_column", cfg.id_column, where) if cfg.id_column else f"{rel}:{lineno}"
            yield {"id": str(doc_id), "text": "" if text is None else str(text)}


def _parquet_file(path: Path, cfg: DataConfig):
    """The open parquet file, once it is known to hold the configured columns, text ones of strings."""
    import pyarrow.parquet as pq  # pyarrow: 0.3 s of start-up, for the data stage only

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise XLabError(f"cannot read {str(path)!r} as parquet: {exc}") from None
    names = pf.schema_arrow.names
    for key, name in (("text_column", cfg.text_column), ("title_column", cfg.title_column),
                      ("id_column", cfg.id_column)):
        if name and name not in names:
            raise XLabError(f"unknown column data.{key}={name!r} in {str(path)!r}; its columns: {', '.join(names)}")
    check_text_columns(path, pf.schema_arrow, cfg)
    return pf


def _parquet(path: Path, rel: str, cfg: DataConfig) -> Iterator[dict]:
    pf = _parquet_file(path, cfg)
    wanted = [c for c in (cfg.text_column, cfg.title_column, cfg.id_column) if c]
    row = 0
    for batch in pf.iter_batches(batch_size=1000, columns=wanted):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            text = cols[cfg.text_column][i] or ""
            if cfg.title_column:
                text = f"{cols[cfg.title_column][i]}\n\n{text}"
            doc_id = cols[cfg.id_column][i] if cfg.id_column else f"{rel}:{row}"
            row += 1
            yield {"id": str(doc_id), "text": text}


def _documents(files: tuple[str, ...], root: str, cfg: DataConfig) -> Iterator[dict]:
    for name in files:
        path = Path(name)
        rel = os.path.relpath(path, root)
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield {"id": rel, "text": _text(path, path.read_bytes())}
        elif suffix == ".jsonl":
            yield from _jsonl(path, rel, cfg)
        else:
            yield from _parquet(path, rel, cfg)


def _fingerprint(cfg: DataConfig) -> str:
    files = resolve_files(cfg.data_files, "data.data_files", SUFFIXES)
    cols = (cfg.text_column, cfg.title_column, cfg.id_column)
    # ids are relative to the glob's root, so the root is part of what names the documents
    return fingerprint("text-files-v1", files_fingerprint(files), str(_root(cfg.data_files).resolve()), cols)


def _load(cfg: DataConfig, ids_only: bool = False) -> datasets.IterableDataset:
    import datasets  # datasets: lazily, only when used

    files = resolve_files(cfg.data_files, "data.data_files", SUFFIXES)
    features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
    # A tuple, not a list: datasets would treat a list as shards to spread over workers, and the order of the
    # documents must be the sorted path order.
    return datasets.IterableDataset.from_generator(
        _documents, features=features,
        gen_kwargs={"files": tuple(str(f) for f in files), "root": str(_root(cfg.data_files)), "cfg": cfg},
    )


def _check(cfg: DataConfig) -> None:
    """Before any work: files match, and each parquet file's columns fit (its footer is all that is read)."""
    for path in resolve_files(cfg.data_files, "data.data_files", SUFFIXES):
        if path.suffix.lower() == ".parquet":
            _parquet_file(path, cfg)


SOURCES.register("text_files")(Source(fingerprint=_fingerprint, load=_load, check=_check))
