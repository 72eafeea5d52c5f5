"""Build (or find in the cache) the tokenizer and the token shards of every split.

Cache layout under `paths.cache_dir`:
    tokenizers/<key>/tokenizer.json   key = source fingerprint + split settings + tokenizer config
    tokens/<key>/meta.json + <split>.bin, <split>.1.bin, ...   (see xlab/data/shards.py)
                                      key = source fingerprint + split settings + hash of tokenizer.json
The source is read in up to three streaming passes, so memory does not grow with the corpus:
  1. ids only: a seeded hash per id gives each document's split (xlab/data/sources.py) and the tokenizer's sample;
  2. (tokenizer missing) the texts of the sample, streamed into the tokenizer trainer;
  3. every text, tokenized in worker processes (xlab/data/encode.py) and appended to its split's shards.
A finished entry is synced and renamed into place (xlab/fsio.py), so an interrupted build never leaves an entry
that looks complete. Pass 3 writes into `tokens/.<key>.partial/` and records its progress there (documents done,
shard lengths) after syncing the files, so a rerun after a crash or kill continues from the last record and yields
the same shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from xlab.data.config import DataConfig, TokenizerConfig
from xlab.data.encode import Encoder
from xlab.data.shards import SplitWriter, shard_name
from xlab.data.sources import (
    SOURCES,
    SPLITS,
    Source,
    assign_splits,
    check_data_config,
    column,
    document_batches,
    document_texts,
    fingerprint,
    hash_keys,
    split_thresholds,
)
from xlab.data.tokenizer import XLabTokenizer, check_tokenizer_config, train_tokenizer
from xlab.errors import XLabError
from xlab.fsio import locked, publish_dir, publish_file

log = logging.getLogger(__name__)
COMMIT_BYTES = 64 << 20  # record progress at least every 64 MB of text (and whenever a shard is finished)
PROGRESS = "progress.json"


@dataclass
class Prepared:
    tokenizer_path: Path
    tokens_dir: Path


@dataclass
class Plan:
    """Pass 1: the split of every document (uint8 index into SPLITS, in source order) and the tokenizer sample."""

    assign: np.ndarray
    sample: np.ndarray  # bool per document

    @property
    def documents(self) -> int:
        return len(self.assign)


def _bar(**kwargs: object) -> tqdm:
    return tqdm(dynamic_ncols=True, mininterval=2.0, **kwargs)


def plan_splits(source: Source, data: DataConfig, train_docs: int | None) -> Plan:
    keys_parts = []
    with _bar(desc="reading ids", unit=" doc") as bar:
        for table in document_batches(source.load(data, True), data.max_documents):
            keys_parts.append(hash_keys(column(table, "id"), data.split_seed))
            bar.update(table.num_rows)
    keys = np.concatenate(keys_parts) if keys_parts else np.zeros(0, np.uint64)
    if len(keys) < 2:
        raise XLabError(f"data={data.name} has {len(keys)} documents; a train and a val split need at least 2")
    assign = assign_splits(keys, split_thresholds(keys, data.split_fractions))
    # The tokenizer's sample: the train documents with the smallest hash keys. That is a uniform random sample of
    # the train split which, like the split, does not depend on row order or sharding.
    train = np.flatnonzero(assign == 0)
    if train_docs is not None and train_docs < len(train):
        train = train[np.argpartition(keys[train], train_docs - 1)[:train_docs]]
    sample = np.zeros(len(keys), dtype=bool)
    sample[train] = True
    log.info("documents per split: %s", {name: int((assign == i).sum()) for i, name in enumerate(SPLITS)})
    return Plan(assign, sample)


def _sample_texts(source: Source, data: DataConfig, plan: Plan) -> Iterator[str]:
    import pyarrow as pa  # pyarrow: 0.3 s of start-up, for the data stage only

    sampled = np.flatnonzero(plan.sample)
    end = int(sampled[-1]) + 1 if len(sampled) else 0  # nothing after the last sampled document needs reading
    pos = 0
    with _bar(desc="tokenizer sample", unit=" doc", total=int(plan.sample.sum())) as bar:
        for table in document_batches(source.load(data, False), end) if end else ():
            mask = plan.sample[pos : pos + table.num_rows]
            pos += table.num_rows
            if mask.any():
                texts = document_texts(table.filter(pa.array(mask))).to_pylist()
                yield from texts
                bar.update(len(texts))


def _write_json(path: Path, obj: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    publish_file(tmp, path)


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _num_proc(data: DataConfig, n_docs: int) -> int:
    if data.num_proc is not None:
        return max(1, data.num_proc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if n_docs < 20_000 else cores


def _files_match(partial: Path, progress: dict, itemsize: int) -> bool:
    """Every recorded shard is on disk with at least its recorded length (more is fine: it is truncated)."""
    for split, state in progress["writers"].items():
        files = [(s["file"], s["tokens"]) for s in state["shards"]]
        files.append((shard_name(split, len(state["shards"])), state["open_tokens"]))
        for name, tokens in files:
            path = partial / name
            if tokens and (not path.exists() or path.stat().st_size < tokens * itemsize):
                return False
    return True


def _load_progress(partial: Path, settings: dict, itemsize: int) -> dict:
    """The progress record of an unfinished pass 3 with the same settings and intact files, or a fresh one (in an
    emptied `partial`)."""
    if (partial / PROGRESS).exists():
        progress = json.loads((partial / PROGRESS).read_text())
        if progress["settings"] == settings and _files_match(partial, progress, itemsize):
            return progress
        log.warning("discarding the unfinished token files in %s (other settings or damaged)", partial)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return {"settings": settings, "documents_done": 0, "writers": {}}


def _tasks(source: Source, data: DataConfig, plan: Plan, done: int, sizes: deque) -> Iterator[list[list[str]]]:
    """The texts of each batch from document `done` on, grouped by split; (documents, text bytes) go to `sizes`."""
    import pyarrow.compute as pc  # pyarrow: 0.3 s of start-up, for the data stage only

    pos = done
    for table in document_batches(source.load(data, False), data.max_documents, skip=done):
        texts = document_texts(table)
        n = table.num_rows
        if pos + n > plan.documents:
            raise XLabError(f"data={data.name} changed while it was being prepared (more documents than before)")
        assign = plan.assign[pos : pos + n]
        pos += n
        sizes.append((n, int(pc.sum(pc.binary_length(texts)).as_py() or 0)))
        texts = texts.to_pylist()
        yield [[t for t, a in zip(texts, assign) if a == i] for i in range(len(SPLITS))]


def _split_meta(shards: list[dict]) -> dict:
    return {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "shards": shards}


def build_tokens(source: Source, data: DataConfig, plan: Plan, tok: XLabTokenizer, tokenizer_file: Path,
                 tokens_dir: Path) -> dict:
    """Pass 3 into `tokens/.<key>.partial/`, resuming from its progress record; publishes `tokens_dir`."""
    partial = tokens_dir.with_name(f".{tokens_dir.name}.partial")
    dtype = np.dtype(np.uint16 if len(tok) <= 2**16 else np.uint32)
    settings = {"dtype": dtype.name, "shard_bytes": int(data.shard_size_mb * 2**20), "documents": plan.documents}
    if (partial / "meta.json").exists():  # finished, but killed before it was renamed into place
        publish_dir(partial, tokens_dir)
        return json.loads((tokens_dir / "meta.json").read_text())
    progress = _load_progress(partial, settings, dtype.itemsize)
    done = int(progress["documents_done"])
    if done:
        log.info("resuming token files %s at document %d of %d", tokens_dir.name, done, plan.documents)
    writers = {name: SplitWriter(partial, name, dtype, settings["shard_bytes"], progress["writers"].get(name))
               for name in SPLITS}
    num_proc = _num_proc(data, plan.documents)
    sizes: deque = deque()  # (documents, text bytes) of each task in flight, to pair with its result

    def commit() -> None:
        progress["writers"] = {name: w.sync() for name, w in writers.items()}
        progress["documents_done"] = done
        _write_json(partial / PROGRESS, progress)

    start, cpu_start, text_bytes, since_commit = time.perf_counter(), time.process_time(), 0, 0
    log.info("tokenizing %d documents with %d process(es) into %s", plan.documents - done, num_proc, partial)
    with Encoder(tokenizer_file, tok.sos_id, tok.eos_id, dtype, num_proc) as encoder, \
            _bar(desc="tokenizing", unit=" doc", total=plan.documents, initial=done) as bar:
        for result in encoder.imap(_tasks(source, data, plan, done, sizes)):
            n, nbytes = sizes.popleft()
            shards_before = sum(len(w.shards) for w in writers.values())
            for writer, (tokens, lengths) in zip(writers.values(), result):
                writer.append(tokens, lengths)
            done += n
            text_bytes += nbytes
            since_commit += nbytes
            bar.update(n)
            bar.set_postfix(MB_s=f"{text_bytes / 1e6 / (time.perf_counter() - start):.1f}", refresh=False)
            if since_commit >= COMMIT_BYTES or sum(len(w.shards) for w in writers.values()) > shards_before:
                commit()
                since_commit = 0
        cpu = time.process_time() - cpu_start + encoder.worker_cpu
    if done != plan.documents:
        raise XLabError(f"data={data.name} changed while it was being prepared: read {done} of "
                        f"{plan.documents} documents")
    meta: dict = {"format": 2, "dtype": dtype.name, "vocab_size": len(tok), "splits": {}}
    for name, writer in writers.items():
        meta["splits"][name] = _split_meta(writer.close())
    elapsed, mb = time.perf_counter() - start, text_bytes / 1e6
    # MB per CPU-second is the per-core speed, whatever else runs on the machine
    log.info("tokenized %.1f MB of text in %.1f s (%.2f MB/s, %d process(es), %.2f MB per CPU-second)", mb, elapsed,
             mb / max(elapsed, 1e-9), num_proc, mb / max(cpu, 1e-9))
    _write_json(partial / "meta.json", meta)  # from here on the partial directory is complete
    (partial / PROGRESS).unlink(missing_ok=True)
    publish_dir(partial, tokens_dir)
    return meta


def prepare_data(
    data: DataConfig, tokenizer: TokenizerConfig, cache_dir: str | Path, tokenizer_file: str | Path | None = None
) -> Prepared:
    """Make sure the tokenizer and every split's token shards exist in the cache; build what is missing.

    With `tokenizer_file` (e.g. a checkpoint's tokenizer.json) no tokenizer is trained: shards are keyed by it.
    """
    check_data_config(data)
    if tokenizer_file is None:  # a given tokenizer file (a checkpoint's, a pretrained model's) is taken as it is
        check_tokenizer_config(tokenizer)
    source = SOURCES.get(data.name)
    cache = Path(cache_dir).expanduser()
    extra = [("max_documents", data.max_documents)] if data.max_documents is not None else []
    split_key = fingerprint(source.fingerprint(data), list(data.split_fractions), data.split_seed, *extra)
    plan: Plan | None = None

    def get_plan() -> Plan:
        nonlocal plan
        if plan is None:
            log.info("reading document ids of data=%s", data.name)
            plan = plan_splits(source, data, tokenizer.train_docs)
        return plan

    if tokenizer_file is None:
        tok_dir = cache / "tokenizers" / fingerprint(split_key, OmegaConf.to_container(OmegaConf.structured(tokenizer)))
        tokenizer_file = tok_dir / "tokenizer.json"
        if tokenizer_file.exists():
            log.info("reusing cached tokenizer %s", tokenizer_file)
        else:
            p = get_plan()
            log.info("training %s tokenizer (vocab %d) on %d documents of the train split",
                     tokenizer.name, tokenizer.vocab_size, int(p.sample.sum()))
            trained = train_tokenizer(_sample_texts(source, data, p), tokenizer)
            tmp = _tmp_dir(tok_dir)
            trained.save(str(tmp / "tokenizer.json"))
            publish_dir(tmp, tok_dir)  # first writer wins
    tokenizer_file = Path(tokenizer_file)
    tok = XLabTokenizer.from_file(tokenizer_file, tokenizer)

    tok_hash = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:16]
    tokens_dir = cache / "tokens" / fingerprint(split_key, tok_hash)
    if (tokens_dir / "meta.json").exists():
        log.info("reusing cached token files %s", tokens_dir)
    else:
        with locked(tokens_dir.with_name(f".{tokens_dir.name}.lock"),
                    lambda: log.info("waiting for another process that is preparing %s", tokens_dir.name)):
            if (tokens_dir / "meta.json").exists():  # built by the process we waited for
                log.info("reusing cached token files %s", tokens_dir)
            else:
                meta = build_tokens(source, data, get_plan(), tok, tokenizer_file, tokens_dir)
                log.info("wrote token files %s: %s", tokens_dir,
                         {k: f"{v['tokens']} tokens in {len(v['shards'])} shard(s)" for k, v in meta["splits"].items()})
    return Prepared(tokenizer_file, tokens_dir)


__all__ = ["SPLITS", "Plan", "Prepared", "build_tokens", "plan_splits", "prepare_data"]
