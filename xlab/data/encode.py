"""Tokenize document batches in parallel, in order, with bounded memory.

Why not `datasets.map(num_proc=...)`: it writes every token again into an Arrow cache (8 bytes a token unless
told otherwise) before we pack them, it needs the corpus as one memory-mapped table (so RSS grows with the corpus),
and its output order cannot be resumed part-way. Here the main process streams batches of texts to a pool of
worker processes (each with its own copy of the tokenizer, batch-encoding in Rust) and takes results back in
submission order, with at most a few batches in flight: memory is bounded by the batch size, and the output is the
same for any number of processes.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Encoded = tuple[np.ndarray, np.ndarray]  # (concatenated tokens of the documents, token count of each)
_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, sos: int, eos: int, dtype: str, threads: bool) -> None:
    if not threads:  # the worker processes are the parallelism; a rayon pool in each would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=Tokenizer.from_file(tokenizer_path), sos=sos, eos=eos, dtype=np.dtype(dtype))


def encode_texts(texts: Sequence[str]) -> Encoded:
    """`<sos> text <eos>` of each text, concatenated, and the length of each."""
    tok, sos, eos, dtype = _worker["tok"], _worker["sos"], _worker["eos"], _worker["dtype"]
    if not texts:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets we never use
    ids = [e.ids for e in encode(list(texts), add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 2 for x in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    flat = np.empty(int(ends[-1]), dtype=dtype)
    body = np.ones(len(flat), dtype=bool)
    body[starts] = body[ends - 1] = False
    flat[starts], flat[ends - 1] = sos, eos
    # one C-level pass over all ids instead of a Python loop per document
    flat[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=len(flat) - 2 * len(ids))
    return flat, lengths


def encode_groups(groups: Sequence[Sequence[str]]) -> tuple[list[Encoded], float]:
    """encode_texts of each group (one group per split) in one task, and the CPU seconds it took."""
    start = time.process_time()
    return [encode_texts(g) for g in groups], time.process_time() - start


class Encoder:
    """`imap(tasks)` yields `encode_groups(task)` for each task, in order, from `num_proc` processes (1: in this
    process, with the tokenizer's own threads). `worker_cpu` sums the CPU seconds spent in worker processes."""

    def __init__(self, tokenizer_path: str, sos: int, eos: int, dtype: np.dtype, num_proc: int) -> None:
        args = (str(tokenizer_path), sos, eos, np.dtype(dtype).str, num_proc == 1)
        self.num_proc = num_proc
        self.worker_cpu = 0.0
        self.pool = None
        if num_proc > 1:
            # spawn, not fork: a clean interpreter per worker inherits no torch/Accelerate threads or locks, and
            # no tokenizer that already used its thread pool (which tokenizers warns about and disables).
            self.pool = mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=args)
        else:
            _init_worker(*args)

    def imap(self, tasks: Iterable[Sequence[Sequence[str]]]) -> Iterator[list[Encoded]]:
        if self.pool is None:  # in this process: its CPU time is the caller's own
            for task in tasks:
                yield encode_groups(task)[0]
            return
        pending: deque = deque()

        def result() -> list[Encoded]:
            encoded, cpu = pending.popleft().get()
            self.worker_cpu += cpu
            return encoded

        for task in tasks:  # Pool.imap would read ahead without limit; keep 2 tasks per worker in flight
            pending.append(self.pool.apply_async(encode_groups, (task,)))
            if len(pending) >= 2 * self.num_proc:
                yield result()
        while pending:
            yield result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
