"""Tokenizers trained with Hugging Face `tokenizers`, wrapped with the small surface the rest of XLab uses.

`tokenizer.name` in configs/tokenizer/*.yaml picks a trainer from TOKENIZERS. A trained tokenizer is a
`tokenizer.json` plus the names of its special tokens (kept in the run's config.yaml).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xlab.config import TokenizerConfig
from xlab.errors import XLabError
from xlab.registry import Registry

Trainer = Callable[[Iterator[str], TokenizerConfig], Tokenizer]
TOKENIZERS: Registry[Trainer] = Registry("tokenizer")


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    return [cfg.sos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token]


@TOKENIZERS.register("bpe")
def train_bpe(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme): any UTF-8 text encodes without unknown tokens."""
    tok = Tokenizer(models.BPE(unk_token=cfg.unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=special_tokens(cfg),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_tokenizer_config(cfg: TokenizerConfig) -> None:
    TOKENIZERS.get(cfg.name)
    specials = special_tokens(cfg)
    if len(set(specials)) != len(specials):
        raise XLabError(f"tokenizer special tokens must be distinct, got {specials}")
    minimum = len(specials) + 256  # the specials plus the 256 byte symbols of byte-level BPE
    if cfg.vocab_size < minimum:
        raise XLabError(f"tokenizer.vocab_size={cfg.vocab_size} is too small; it must be >= {minimum}")


class XLabTokenizer:
    """encode/decode plus the seed's lookups: `tok[tok.sos_token] -> id`, `len(tok)`."""

    def __init__(self, tokenizer: Tokenizer, sos_token: str, eos_token: str, pad_token: str, unk_token: str) -> None:
        self.tokenizer = tokenizer
        self.sos_token, self.eos_token, self.pad_token, self.unk_token = sos_token, eos_token, pad_token, unk_token
        for token in (sos_token, eos_token, pad_token, unk_token):
            if tokenizer.token_to_id(token) is None:
                raise XLabError(f"special token {token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_file(cls, path: str | Path, cfg: TokenizerConfig) -> XLabTokenizer:
        return cls(Tokenizer.from_file(str(path)), cfg.sos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __getitem__(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise KeyError(token)
        return idx

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def sos_id(self) -> int:
        return self[self.sos_token]

    @property
    def eos_id(self) -> int:
        return self[self.eos_token]
