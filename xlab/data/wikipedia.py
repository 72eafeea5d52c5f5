"""`data=wikipedia`: English Wikipedia (wikimedia/wikipedia 20231101.en: 6.4M articles, ~20 GB of text).

Without `data.data_files` the articles come from `datasets.load_dataset(hub_dataset, hub_config)` (downloaded and
cached once, or with `data.streaming=true` read over the network each pass). With `data.data_files=GLOB` the same
code reads local parquet shards with Wikipedia's columns (id, url, title, text) in place — how tests and offline
users run it. A document is `title + "\\n\\n" + text`; its id is the article id, so an article's split never depends
on which shard or row it is in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xlab.data.config import DataConfig
from xlab.data.sources import SOURCES, Source, check_text_columns, files_fingerprint, fingerprint, resolve_files
from xlab.errors import XLabError

if TYPE_CHECKING:
    import datasets


def _columns(cfg: DataConfig, ids_only: bool) -> dict[str, str]:
    """Source column -> the name preparation reads (id, title, text)."""
    cols = {cfg.id_column or "id": "id"}
    if not ids_only:
        if cfg.title_column:
            cols[cfg.title_column] = "title"
        cols[cfg.text_column] = "text"
    return cols


def _check_columns(path: str, available: list[str], cfg: DataConfig) -> None:
    for key in ("id_column", "title_column", "text_column"):
        name = getattr(cfg, key) or ("id" if key == "id_column" else None)
        if name is not None and name not in available:
            raise XLabError(f"unknown column data.{key}={name!r} in {path}; its columns: {', '.join(available)}")


def _fingerprint(cfg: DataConfig) -> str:
    cols = (cfg.id_column, cfg.title_column, cfg.text_column)
    if cfg.data_files:
        files = resolve_files(cfg.data_files, "data.data_files", (".parquet",))
        return fingerprint("wikipedia-files-v1", files_fingerprint(files), cols)
    # A hub dataset's config name pins its content (20231101.en is a fixed dump).
    return fingerprint("wikipedia-hub-v1", cfg.hub_dataset, cfg.hub_config, cfg.hub_split, cols)


def _load(cfg: DataConfig, ids_only: bool = False) -> datasets.IterableDataset | datasets.Dataset:
    import datasets  # datasets: lazily, only when used
    import pyarrow.parquet as pq

    columns = _columns(cfg, ids_only)
    if cfg.data_files:
        files = resolve_files(cfg.data_files, "data.data_files", (".parquet",))
        try:
            schema = pq.read_schema(files[0])
        except Exception as exc:  # pyarrow raises several types for a file that is not parquet
            raise XLabError(f"cannot read {str(files[0])!r} as parquet: {exc}") from None
        _check_columns(str(files[0]), schema.names, cfg)
        check_text_columns(files[0], schema, cfg)
        # Local files are read in place (streaming): converting them to an Arrow copy would only cost disk.
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True,
                                   columns=list(columns))
    else:
        if not cfg.hub_dataset:
            raise XLabError("data.hub_dataset is not set; set it (e.g. wikimedia/wikipedia) or data.data_files=GLOB")
        try:
            ds = datasets.load_dataset(cfg.hub_dataset, cfg.hub_config, split=cfg.hub_split,
                                       streaming=cfg.streaming, columns=list(columns))
        except Exception as exc:  # offline, unknown config, ...: datasets raises many types, each over many lines
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise XLabError(f"cannot load data.hub_dataset={cfg.hub_dataset!r} data.hub_config={cfg.hub_config!r} "
                            f"({reason}); offline, point data.data_files at local parquet shards") from exc
    renames = {src: dst for src, dst in columns.items() if src != dst}
    return ds.rename_columns(renames) if renames else ds


SOURCES.register("wikipedia")(Source(fingerprint=_fingerprint, load=_load))
