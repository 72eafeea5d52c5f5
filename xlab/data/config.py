"""The data and tokenizer config groups (configs/data, configs/tokenizer): what to read and how to tokenize it."""

from __future__ import annotations

from dataclasses import dataclass, field

from xlab.schema import (
    NON_NEGATIVE,
    POSITIVE,
    Choice,
    Range,
    Schema,
)


class Normalization(Choice):
    nfc = "nfc"
    nfkc = "nfkc"
    nfd = "nfd"
    nfkd = "nfkd"


class Split(Choice):
    train = "train"
    val = "val"
    test = "test"
    predict = "predict"


@dataclass
class DataConfig(Schema):
    """A document source (xlab/data/) split by document into train/val/test/predict; see configs/data/*.yaml."""

    name: str = "pydocs"
    split_fractions: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.025, 0.025])
    split_seed: int = 1234
    num_proc: int | None = None  # tokenization processes; None = 1 for small corpora, all cores for large ones
    max_documents: int | None = None  # only the first N documents of the source (partial runs); None = all
    data_files: str | None = None  # glob of local files (wikipedia: parquet shards; text_files: txt/jsonl/parquet)
    streaming: bool = False  # hub datasets: stream instead of download + convert; local files are read in place
    hub_dataset: str | None = None  # datasets.load_dataset path, e.g. wikimedia/wikipedia
    hub_config: str | None = None  # its config name, e.g. 20231101.en
    hub_split: str = "train"
    text_column: str = "text"
    title_column: str | None = None  # prepended to the text as its first line (Wikipedia's title)
    id_column: str | None = None  # a stable document id; None (text_files) = file path and row number
    shard_size_mb: float = 1024.0  # token shard files are cut at document boundaries below this size

    # split_fractions (4 fractions summing to 1): xlab/data/sources.py
    LIMITS = {"num_proc": Range(1, note="(or null)"), "max_documents": Range(1, note="(or null)"),
              "shard_size_mb": POSITIVE}


@dataclass
class TokenizerConfig(Schema):
    """A tokenizer trained on the train split; see xlab/data/tokenizer.py."""

    name: str = "bpe"  # bpe (byte-level) | unigram | wordpiece
    vocab_size: int = 4096
    min_frequency: int = 2  # bpe, wordpiece: merges seen fewer times are not learned
    normalization: Normalization | None = None  # unicode normalisation before tokenizing
    lowercase: bool = False
    train_docs: int | None = 100_000  # train on this many documents sampled from the train split; None = all
    sos_token: str = "<|sos|>"
    eos_token: str = "<|eos|>"
    pad_token: str = "<|pad|>"
    unk_token: str = "<|unk|>"
    extra_special_tokens: list[str] = field(default_factory=list)  # reserved ids after the four above

    # vocab_size's minimum depends on the special tokens and the model: xlab/data/tokenizer.py
    LIMITS = {"min_frequency": NON_NEGATIVE, "train_docs": Range(1, note="(or null for the whole train split)")}
