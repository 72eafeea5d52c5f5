"""XLabDataModule: the tokenizer and the token windows a training or evaluation run reads.

A split's tokens are one stream over its shard files (xlab/data/shards.py: memmaps with cumulative offsets), so
windows read across shard boundaries like across document boundaries. Training draws random windows of max_len+1
tokens from the train split. Optimizer step k reads one global batch of batch_size x world_size x grad_accum_steps
windows, drawn by a generator seeded with (seed, k); micro-batch m of rank r takes the batch_size rows from
(m * world_size + r) * batch_size. So ranks see different windows, the sampler's whole state is the number of
micro-batches drawn, and N processes x A accumulation steps with batch B read exactly the data of one process with
batch N*A*B (runs compare, and resume, across process counts and accumulation settings). Evaluation reads fixed,
non-overlapping windows from the start of a split, so every run scores the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xlab.checkpoint.layout import TOKENIZER
from xlab.checkpoint.read import Checkpoint
from xlab.data.config import DataConfig, TokenizerConfig
from xlab.data.prepare import Prepared, prepare_data
from xlab.data.shards import TokenShards
from xlab.data.sources import SPLITS
from xlab.data.tokenizer import XLabTokenizer, load_tokenizer
from xlab.errors import XLabError
from xlab.schema import user_cache_dir

Tokens = np.ndarray | TokenShards


def as_shards(tokens: Tokens) -> TokenShards:
    return tokens if isinstance(tokens, TokenShards) else TokenShards([tokens])


class RandomWindows:
    """Batches of (inputs, targets), each a random window of the token stream shifted by one."""

    def __init__(
        self, tokens: Tokens, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        tokens = as_shards(tokens)
        if len(tokens) < seq_len + 1:
            raise XLabError(
                f"the train split has {len(tokens)} tokens, fewer than one window of model.max_len+1={seq_len + 1}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.batches_drawn = 0
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(self.batches_drawn, self.accum_steps)
        rng = np.random.default_rng([self.seed, step])
        size = self.batch_size * self.world_size * self.accum_steps
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=size)
        first = (micro * self.world_size + self.rank) * self.batch_size
        starts = starts[first : first + self.batch_size]
        self.batches_drawn += 1
        window = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = int(state["batches_drawn"])


def eval_windows(
    tokens: Tokens, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows with stride seq_len: each target token of the split is scored exactly once."""
    tokens = as_shards(tokens)
    starts = np.arange(0, len(tokens) - seq_len, seq_len)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    offsets = np.arange(seq_len + 1)
    for i in range(0, len(starts), batch_size):
        window = torch.from_numpy(tokens[starts[i : i + batch_size, None] + offsets].astype(np.int64))
        yield window[:, :-1], window[:, 1:]


class XLabDataModule:
    """Tokenizer plus token files of a data config; builds them on first use (see xlab/data/prepare.py)."""

    def __init__(
        self,
        data: DataConfig,
        tokenizer: TokenizerConfig,
        cache_dir: str | Path | None = None,
        tokenizer_file: str | Path | None = None,
    ) -> None:
        self.data_cfg, self.tokenizer_cfg = data, tokenizer
        self.cache_dir = Path(cache_dir or user_cache_dir())
        self._tokenizer_file = tokenizer_file
        self._prepared: Prepared | None = None
        self._tokenizer: XLabTokenizer | None = None

    def prepare(self) -> Prepared:
        if self._prepared is None:
            self._prepared = prepare_data(self.data_cfg, self.tokenizer_cfg, self.cache_dir, self._tokenizer_file)
        return self._prepared

    @property
    def tokenizer_path(self) -> Path:
        return Path(self._tokenizer_file) if self._tokenizer_file else self.prepare().tokenizer_path

    @property
    def tokenizer(self) -> XLabTokenizer:
        if self._tokenizer is None:
            self._tokenizer = XLabTokenizer.from_file(self.tokenizer_path, self.tokenizer_cfg)
        return self._tokenizer

    def tokens(self, split: str) -> TokenShards:
        """The split's token stream (memmapped shards; index it like an array, np.asarray() to concatenate)."""
        if split not in SPLITS:
            raise XLabError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return TokenShards.open(self.prepare().tokens_dir, split)

    def train_windows(
        self, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, accum_steps: int = 1
    ) -> RandomWindows:
        return RandomWindows(self.tokens("train"), seq_len, batch_size, seed, rank, world_size, accum_steps)

    def eval_windows(
        self, split: str, seq_len: int, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.check_split(split, seq_len)
        return eval_windows(self.tokens(split), seq_len, batch_size, max_batches)

    def check_split(self, split: str, seq_len: int) -> None:
        """Fail in one line unless `split` holds at least one window of seq_len + 1 tokens."""
        n = len(self.tokens(split))
        if n < seq_len + 1:
            raise XLabError(f"the {split} split has {n} tokens, fewer than one window of {seq_len + 1}; use more "
                            "documents (data.max_documents, data.data_files) or a larger share for it "
                            "(data.split_fractions)")

    @classmethod
    def load_from_checkpoint(
        cls, path: str | Path | Checkpoint, map_location: object = None, cache_dir: str | Path | None = None
    ) -> XLabDataModule:
        """The data module of a checkpoint or export: its tokenizer.json, and its data config for the token files
        (rebuilt with that tokenizer if this machine's cache lacks them). `map_location` is accepted for the
        original API's signature; data lives on the host. The tokenizer is loaded now: one that does not fit the
        weights is refused here, not as an IndexError mid-run."""
        ckpt = Checkpoint.of(path)
        data, tokenizer = ckpt.section("data", DataConfig), ckpt.section("tokenizer", TokenizerConfig)
        module = cls(data, tokenizer, cache_dir, ckpt.file(TOKENIZER))
        module._tokenizer = load_tokenizer(ckpt)
        return module
