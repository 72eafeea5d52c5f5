"""Tokenizers trained with Hugging Face `tokenizers`, wrapped with the small surface the rest of XLab uses.

`tokenizer.name` in configs/tokenizer/*.yaml picks a trainer from TOKENIZERS: `bpe`, `unigram` or `wordpiece`.
All three work on byte-level pre-tokens (GPT-2's scheme: text is split into words with their leading space and
each byte is mapped to a printable symbol), and all 256 byte symbols are in every vocabulary. So any UTF-8 text
encodes without unknown tokens and decodes back exactly — up to the configured normalisation (NFC/NFKC, lowercase),
which is applied before tokenizing. A trained tokenizer is a `tokenizer.json` plus the names of its special tokens
(kept in the run's config.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from xlab.checkpoint.layout import TOKENIZER
from xlab.checkpoint.read import Checkpoint
from xlab.data.config import TokenizerConfig
from xlab.errors import XLabError
from xlab.fsio import opened_inside
from xlab.registry import Registry

Trainer = Callable[[Iterator[str], TokenizerConfig], Tokenizer]
TOKENIZERS: Registry[Trainer] = Registry("tokenizer")
# WordPiece marks word-internal pieces with a prefix. It must be a symbol the byte-level alphabet (U+0021..U+0143)
# never produces, or decoding could not tell a prefix from text; "##" would eat Markdown headings.
WORDPIECE_PREFIX = "\u2026"  # "…"


def special_tokens(cfg: TokenizerConfig) -> list[str]:
    return [cfg.sos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token, *cfg.extra_special_tokens]


def _normalizer(cfg: TokenizerConfig) -> normalizers.Normalizer | None:
    steps = []
    if cfg.normalization:
        steps.append({"nfc": normalizers.NFC, "nfd": normalizers.NFD, "nfkc": normalizers.NFKC,
                      "nfkd": normalizers.NFKD}[str(cfg.normalization)]())
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps) if steps else None


def _byte_level(model: models.Model, cfg: TokenizerConfig, decoder: decoders.Decoder | None = None) -> Tokenizer:
    tok = Tokenizer(model)
    normalizer = _normalizer(cfg)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoder or decoders.ByteLevel()
    return tok


def _trainer_args(cfg: TokenizerConfig) -> dict:
    """What every trainer is given: the vocabulary size, the special tokens first, and all 256 byte symbols (so any
    UTF-8 text stays encodable)."""
    return dict(vocab_size=cfg.vocab_size, special_tokens=special_tokens(cfg),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)


@TOKENIZERS.register("bpe")
def train_bpe(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme): merges of the most frequent adjacent symbol pairs. A word that is itself in
    the vocabulary becomes that one token without replaying merges (`ignore_merges`, as in Llama 3): ~10% faster
    encoding, and decoding is unaffected."""
    tok = _byte_level(models.BPE(unk_token=cfg.unk_token, ignore_merges=True), cfg)
    trainer = trainers.BpeTrainer(min_frequency=cfg.min_frequency, **_trainer_args(cfg))
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@TOKENIZERS.register("unigram")
def train_unigram(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Unigram language model (SentencePiece's default) over byte-level pre-tokens: the most likely segmentation
    under learned piece probabilities. `min_frequency` does not apply. A small corpus may yield fewer pieces than
    vocab_size."""
    tok = _byte_level(models.Unigram(), cfg)
    trainer = trainers.UnigramTrainer(unk_token=cfg.unk_token, **_trainer_args(cfg))
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@TOKENIZERS.register("wordpiece")
def train_wordpiece(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """WordPiece (BERT's model) over byte-level pre-tokens: greedy longest-match, word-internal pieces prefixed."""
    decoder = decoders.Sequence([decoders.Replace(WORDPIECE_PREFIX, ""), decoders.ByteLevel()])
    tok = _byte_level(models.WordPiece(unk_token=cfg.unk_token, continuing_subword_prefix=WORDPIECE_PREFIX), cfg,
                      decoder)
    trainer = trainers.WordPieceTrainer(
        min_frequency=cfg.min_frequency, continuing_subword_prefix=WORDPIECE_PREFIX, **_trainer_args(cfg),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # WordPiece turns a whole word into <unk> when one piece is missing. The trainer only adds the word-internal
    # form of the bytes it saw there, so add all 256, in place of the last-learned pieces to keep vocab_size.
    vocab = tok.get_vocab()
    missing = [WORDPIECE_PREFIX + c for c in pre_tokenizers.ByteLevel.alphabet() if WORDPIECE_PREFIX + c not in vocab]
    if missing:
        specials = set(special_tokens(cfg))
        keep = sorted(vocab.items(), key=lambda kv: kv[1])
        room = max(len(keep) + len(missing) - cfg.vocab_size, 0)
        droppable = [i for i, (piece, _) in enumerate(keep) if piece not in specials and len(piece) > 1
                     and not (piece.startswith(WORDPIECE_PREFIX) and len(piece) == len(WORDPIECE_PREFIX) + 1)]
        drop = set(droppable[len(droppable) - room:]) if room else set()
        pieces = [piece for i, (piece, _) in enumerate(keep) if i not in drop] + missing
        model = models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token=cfg.unk_token,
                                 continuing_subword_prefix=WORDPIECE_PREFIX, max_input_chars_per_word=10_000)
        tok.model = model
    else:
        tok.model = models.WordPiece(vocab, unk_token=cfg.unk_token, continuing_subword_prefix=WORDPIECE_PREFIX,
                                     max_input_chars_per_word=10_000)  # the default 100 would <unk> long URLs
    tok.add_special_tokens(special_tokens(cfg))  # re-bind the specials to the new model's ids
    return tok


def check_tokenizer_config(cfg: TokenizerConfig) -> None:
    TOKENIZERS.get(cfg.name)
    specials = special_tokens(cfg)
    if len(set(specials)) != len(specials):
        raise XLabError(f"tokenizer special tokens must be distinct, got {specials}")
    # the specials plus the 256 byte symbols (WordPiece: also their word-internal forms)
    minimum = len(specials) + (512 if cfg.name == "wordpiece" else 256)
    if cfg.vocab_size < minimum:
        raise XLabError(f"tokenizer.vocab_size={cfg.vocab_size} is too small; it must be >= {minimum}")


def train_tokenizer(texts: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    check_tokenizer_config(cfg)
    return TOKENIZERS.get(cfg.name)(texts, cfg)


_BYTE_SYMBOLS = frozenset(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's printable stand-ins, one per byte
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte tokens (pretrained Llama tokenizers)


def piece_bytes(piece: str) -> int:
    """Bytes of text one vocabulary piece decodes to: byte-level pieces (ours, GPT-2's) count their byte symbols
    (WordPiece's continuation prefix is not one); SentencePiece pieces count `<0xNN>` as one byte and `▁` as a
    space (pretrained tokenizers of init_from, best effort)."""
    if all(c in _BYTE_SYMBOLS for c in piece.removeprefix(WORDPIECE_PREFIX)):
        return len(piece.removeprefix(WORDPIECE_PREFIX))
    if _BYTE_FALLBACK.fullmatch(piece):
        return 1
    return len(piece.replace("\u2581", " ").encode("utf-8"))


class XLabTokenizer:
    """encode/decode plus the original API's lookups: `tok[tok.sos_token] -> id`, `len(tok)`."""

    def __init__(self, tokenizer: Tokenizer, sos_token: str, eos_token: str, pad_token: str, unk_token: str) -> None:
        self.tokenizer = tokenizer
        self.sos_token, self.eos_token, self.pad_token, self.unk_token = sos_token, eos_token, pad_token, unk_token
        for token in (sos_token, eos_token, pad_token, unk_token):
            if tokenizer.token_to_id(token) is None:
                raise XLabError(f"special token {token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_file(cls, path: str | Path, cfg: TokenizerConfig) -> XLabTokenizer:
        return cls(Tokenizer.from_file(str(path)), cfg.sos_token, cfg.eos_token, cfg.pad_token, cfg.unk_token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (special tokens: 0), so a sequence's bytes are a table lookup and a
        sum, and losses convert to bits per byte. Exact for XLab's byte-level tokenizers: their sum over a text's
        tokens is its (normalised) UTF-8 length."""
        table = np.zeros(len(self), dtype=np.int64)
        specials = set(self.tokenizer.get_added_tokens_decoder())  # ids of added (special) tokens
        for piece, idx in self.tokenizer.get_vocab(with_added_tokens=False).items():
            if idx not in specials:
                table[idx] = piece_bytes(piece)
        return table

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



def load_tokenizer(path: str | Path | Checkpoint) -> XLabTokenizer:
    """A checkpoint's tokenizer, or a one-line error when it cannot be read, lacks the config's special tokens or
    has ids beyond the weights' embedding rows (a tokenizer.json of another run)."""
    ckpt = Checkpoint.of(path)
    file = ckpt / TOKENIZER
    try:
        with opened_inside(ckpt.path, TOKENIZER) as opened:
            tokenizer = XLabTokenizer.from_file(opened, ckpt.section("tokenizer", TokenizerConfig))
    except XLabError:
        raise
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a damaged file
        raise XLabError(f"cannot read the tokenizer {file}: {str(exc).strip().splitlines()[0]}") from None
    ids = max(len(tokenizer), 1 + max(tokenizer.tokenizer.get_vocab(with_added_tokens=True).values()))
    rows = ckpt.vocab_rows()
    # XLab sizes the embedding to its tokenizer exactly; a transformers model (init_from) may have spare rows.
    if ids > rows or (not ckpt.config.get("init_from") and ids != rows):
        raise XLabError(f"{file} has {ids} token ids but the weights in {ckpt} have {rows} embedding rows: the "
                        "tokenizer is not the one these weights were trained with")
    return tokenizer
