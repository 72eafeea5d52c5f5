"""Build (or find in the cache) the tokenizer and the packed token files of every split.

Cache layout under `paths.cache_dir`:
    tokenizers/<key>/tokenizer.json   key = source fingerprint + split settings + tokenizer config
    tokens/<key>/{train,val,test,predict}.bin + meta.json
                                      key = source fingerprint + split settings + hash of tokenizer.json
Each entry is written to a temporary directory and renamed into place, so an interrupted build never leaves an
entry that looks complete. Token files are flat arrays: <sos> doc <eos> <sos> doc <eos> ..., uint16 when the
vocabulary fits, else uint32, read back with np.memmap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf

from xlab.config import DataConfig, TokenizerConfig
from xlab.data.sources import SOURCES, SPLITS, fingerprint, split_dataset
from xlab.tokenizer import TOKENIZERS, XLabTokenizer

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokenizer_path: Path
    tokens_dir: Path
    built_tokenizer: bool
    built_tokens: bool


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished temporary directory into place (first writer wins)."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        os.replace(tmp, final)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _num_proc(data: DataConfig, n_docs: int) -> int:
    if data.num_proc is not None:
        return max(1, data.num_proc)
    return 1 if n_docs < 20_000 else (os.cpu_count() or 1)


def write_tokens(ds: datasets.Dataset, tok: XLabTokenizer, path: Path, num_proc: int) -> int:
    """Tokenize one split with datasets.map and append it to `path` chunk by chunk; returns the token count."""
    sos, eos = tok.sos_id, tok.eos_id
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32

    def encode(batch: dict) -> dict:
        return {"ids": [[sos, *ids, eos] for ids in tok.encode_batch(batch["text"])]}

    encoded = ds.map(
        encode, batched=True, batch_size=256, num_proc=num_proc if len(ds) > num_proc else None,
        remove_columns=ds.column_names, desc=f"tokenizing {path.stem}",
    )
    total = 0
    with open(path, "wb") as out:
        for chunk in encoded.data.column("ids").chunks:  # Arrow chunks: flatten without Python per-token work
            flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            flat.tofile(out)
            total += flat.size
    return total


def prepare_data(
    data: DataConfig, tokenizer: TokenizerConfig, cache_dir: str | Path, tokenizer_file: str | Path | None = None
) -> Prepared:
    """Make sure the tokenizer and every split's token file exist in the cache; build what is missing.

    With `tokenizer_file` (e.g. a checkpoint's tokenizer.json) no tokenizer is trained: shards are keyed by it.
    """
    source = SOURCES.get(data.name)
    cache = Path(cache_dir).expanduser()
    split_key = fingerprint(source.fingerprint(data), list(data.split_fractions), data.split_seed)
    splits: dict[str, datasets.Dataset] | None = None

    def get_splits() -> dict[str, datasets.Dataset]:
        nonlocal splits
        if splits is None:
            log.info("loading documents of data=%s", data.name)
            splits = split_dataset(source.load(data), data.split_fractions, data.split_seed)
            log.info("documents per split: %s", {k: len(v) for k, v in splits.items()})
        return splits

    built_tokenizer = False
    if tokenizer_file is None:
        tok_dir = cache / "tokenizers" / fingerprint(split_key, OmegaConf.to_container(OmegaConf.structured(tokenizer)))
        tokenizer_file = tok_dir / "tokenizer.json"
        if tokenizer_file.exists():
            log.info("reusing cached tokenizer %s", tokenizer_file)
        else:
            train = get_splits()["train"]
            log.info("training %s tokenizer (vocab %d) on %d documents",
                     tokenizer.name, tokenizer.vocab_size, len(train))
            texts = (row["text"] for row in train)
            trained = TOKENIZERS.get(tokenizer.name)(texts, tokenizer)
            tmp = _tmp_dir(tok_dir)
            trained.save(str(tmp / "tokenizer.json"))
            _publish(tmp, tok_dir)
            built_tokenizer = True
    tokenizer_file = Path(tokenizer_file)
    tok = XLabTokenizer.from_file(tokenizer_file, tokenizer)

    tok_hash = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:16]
    tokens_dir = cache / "tokens" / fingerprint(split_key, tok_hash)
    built_tokens = False
    if (tokens_dir / "meta.json").exists():
        log.info("reusing cached token files %s", tokens_dir)
    else:
        tmp = _tmp_dir(tokens_dir)
        meta: dict = {"dtype": "uint16" if len(tok) <= 2**16 else "uint32", "vocab_size": len(tok), "splits": {}}
        for name, ds in get_splits().items():
            n = write_tokens(ds, tok, tmp / f"{name}.bin", _num_proc(data, len(ds)))
            meta["splits"][name] = {"documents": len(ds), "tokens": n}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, tokens_dir)
        built_tokens = True
        log.info("wrote token files %s: %s", tokens_dir, {k: v["tokens"] for k, v in meta["splits"].items()})
    return Prepared(tokenizer_file, tokens_dir, built_tokenizer, built_tokens)


__all__ = ["SPLITS", "Prepared", "prepare_data", "write_tokens"]
