"""Token shard files: writing them resumably, and reading a split's shards as one token stream.

A split is a sequence of documents, each stored as `<sos> tokens <eos>`, in shard files of at most
`data.shard_size_mb` (cut between documents; one document bigger than that gets a shard of its own). Shard 0 of a
split is `<split>.bin` (the name single-file caches have always used), shard i > 0 is `<split>.<i>.bin`. The index
`meta.json` lists each split's shards with their token and document counts.

A writer's state is the list of finished shards plus the length of the open one, which is all a killed
preparation needs to continue: truncate the open shard to its recorded length and append the same documents again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def shard_name(split: str, index: int) -> str:
    return f"{split}.bin" if index == 0 else f"{split}.{index}.bin"


class SplitWriter:
    """Appends encoded documents of one split to its shard files in `directory`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_bytes: int, state: dict | None = None):
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.shard_tokens = max(1, int(shard_bytes) // self.dtype.itemsize)
        state = state or {"shards": [], "open_tokens": 0, "open_documents": 0}
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.open_tokens, self.open_documents = int(state["open_tokens"]), int(state["open_documents"])
        path = self._open_path()
        # Anything past the recorded state was written after the last commit: drop it, it will be written again.
        if path.exists() or self.open_tokens:
            with open(path, "ab") as f:
                f.truncate(self.open_tokens * self.dtype.itemsize)
        for later in directory.glob(f"{split}.*.bin"):
            if _index(later.name, split) > len(self.shards):
                later.unlink()
        self._file = open(path, "ab")  # kept open across appends; closed in close()

    def _open_path(self) -> Path:
        return self.directory / shard_name(self.split, len(self.shards))

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Add documents: `tokens` is their concatenation, `lengths` the token count of each."""
        tokens = tokens.astype(self.dtype, copy=False)
        ends = np.cumsum(lengths)
        pos, doc = 0, 0  # first token and first document not yet written
        while doc < len(lengths):
            # how many of the next documents still fit in the open shard
            fit = int(np.searchsorted(ends[doc:] - pos, self.shard_tokens - self.open_tokens, side="right"))
            if fit == 0 and self.open_tokens:
                self._next_shard()
                continue
            fit = max(fit, 1)  # a document bigger than a shard gets a shard of its own rather than being cut
            end = int(ends[doc + fit - 1])
            self._file.write(tokens[pos:end].tobytes())
            self.open_tokens += end - pos
            self.open_documents += fit
            pos, doc = end, doc + fit
            if self.open_tokens >= self.shard_tokens:
                self._next_shard()

    def _next_shard(self) -> None:
        self._file.close()
        self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self.open_tokens,
                            "documents": self.open_documents})
        self.open_tokens = self.open_documents = 0
        self._file = open(self._open_path(), "ab")

    def sync(self) -> dict:
        """Flush to disk; returns the state to record (valid once this returns)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return {"shards": list(self.shards), "open_tokens": self.open_tokens, "open_documents": self.open_documents}

    def close(self) -> list[dict[str, Any]]:
        """Finish the split; returns its shard list (an empty open shard is removed unless it is the only one)."""
        self.sync()
        self._file.close()
        if self.open_tokens or not self.shards:
            self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self.open_tokens,
                                "documents": self.open_documents})
        else:
            self._open_path().unlink()
        return self.shards


def _index(name: str, split: str) -> int:
    middle = name[len(split) + 1 : -len(".bin")]
    return int(middle) if middle.isdigit() else 0


def split_shards(meta: dict, split: str) -> list[dict[str, Any]]:
    """A split's shard list; caches written before shards existed have one `<split>.bin` per split."""
    info = meta["splits"][split]
    return info.get("shards") or [{"file": f"{split}.bin", "tokens": info["tokens"], "documents": info["documents"]}]


class TokenShards:
    """The token stream of one split, read by memmap from its shard files, indexed like one flat array.

    `tokens[idx]` gathers global positions (ints, slices or integer arrays of any shape) across shard boundaries;
    np.asarray(tokens) concatenates everything (small splits and tests only).
    """

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)
        self.offsets = np.cumsum([0, *(len(a) for a in self.arrays)]).astype(np.int64)

    @classmethod
    def open(cls, directory: str | Path, split: str) -> TokenShards:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        arrays = [np.memmap(directory / s["file"], dtype=meta["dtype"], mode="r")
                  for s in split_shards(meta, split) if s["tokens"]]
        shards = cls(arrays)
        shards.dtype = np.dtype(meta["dtype"])
        return shards

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.arrays) == 1:
            return self.arrays[0][idx]
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range for a split of {len(self)} tokens")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.arrays[s][idx[mask] - self.offsets[s]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        flat = np.concatenate(self.arrays) if self.arrays else np.zeros(0, dtype=self.dtype)
        return flat.astype(dtype, copy=False) if dtype is not None else flat

    def documents(self, sos: int, limit: int | None = None, chunk: int = 1 << 22) -> list[np.ndarray]:
        """The first `limit` documents as stored (`<sos> ... <eos>`). Documents never cross shards; each shard is
        scanned for <sos> in chunks, so finding a few documents does not read a big split whole."""
        docs: list[np.ndarray] = []
        for arr in self.arrays:
            starts: list[int] = []
            lo = 0
            while lo < len(arr) and (limit is None or len(docs) + len(starts) <= limit):
                starts.extend((lo + np.flatnonzero(np.asarray(arr[lo : lo + chunk]) == sos)).tolist())
                lo += chunk
            ends = starts[1:] + ([len(arr)] if lo >= len(arr) else [])
            for a, b in zip(starts, ends):
                docs.append(np.asarray(arr[a:b]))
                if limit is not None and len(docs) >= limit:
                    return docs
        return docs
