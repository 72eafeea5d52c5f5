"""Every tokenizer kind: trains, round-trips unicode text exactly, and applies its normalisation as configured."""

from __future__ import annotations

import pytest

from xlab.data.config import TokenizerConfig
from xlab.data.synthetic import ArticleWriter
from xlab.data.tokenizer import TOKENIZERS, XLabTokenizer, check_tokenizer_config, train_tokenizer
from xlab.errors import XLabError

KINDS = ["bpe", "unigram", "wordpiece"]
# Characters the training texts never contain (CJK, emoji, combining marks, tabs, runs of spaces, "##", "…").
UNICODE = "Return   the list — naïve café 数字 🙂\n\tend ## Heading… ﬁ x²\u0301 Ωμέγα"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    writer = ArticleWriter(seed=1)
    return [writer.article(i)["text"] for i in range(120)]


def make(kind: str, texts: list[str], **kwargs) -> XLabTokenizer:
    cfg = TokenizerConfig(name=kind, vocab_size=800, **kwargs)
    return XLabTokenizer(train_tokenizer(iter(texts), cfg), cfg.sos_token, cfg.eos_token, cfg.pad_token,
                         cfg.unk_token)


def test_registry_lists_the_three_kinds():
    assert TOKENIZERS.names() == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_trains_and_round_trips_unicode(kind, texts):
    tok = make(kind, texts, extra_special_tokens=["<|mask|>"])
    assert 600 < len(tok) <= 800
    assert [tok[t] for t in (tok.sos_token, tok.eos_token, tok.pad_token, tok.unk_token, "<|mask|>")] == [0, 1, 2, 3, 4]
    for text in (UNICODE, texts[0][:2000], ""):
        ids = tok.encode(text)
        assert tok.unk_token not in tok.tokenizer.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.decode([tok.sos_id, *ids, tok.eos_id]) == text  # specials are dropped when decoding
    # it learned something: common text takes far fewer tokens than bytes
    sample = texts[1][:3000]
    assert len(tok.encode(sample)) < len(sample.encode()) / 2.5


@pytest.mark.parametrize("kind", KINDS)
def test_lowercase_and_nfkc_as_configured(kind, texts):
    raw = "Ｈｅｌｌｏ ＷＯＲＬＤ ﬁne Café"
    plain = make(kind, texts)
    assert plain.decode(plain.encode(raw)) == raw
    normalised = make(kind, texts, normalization="nfkc", lowercase=True)
    assert normalised.decode(normalised.encode(raw)) == "hello world fine café"
    assert normalised.encode("HELLO World") == normalised.encode("hello world")
    nfc = make(kind, texts, normalization="nfc")
    assert nfc.decode(nfc.encode("Cafe\u0301")) == "Caf\u00e9"  # combining accent composed


def test_bad_tokenizer_settings_are_one_line_errors():
    with pytest.raises(XLabError, match="tokenizer.normalization='nfkx' is not valid; valid: nfc, nfkc, nfd, nfkd"):
        check_tokenizer_config(TokenizerConfig(normalization="nfkx"))  # the schema refuses it (xlab/schema.py)
    with pytest.raises(XLabError, match="unknown tokenizer 'sentencepiece'; valid: bpe, unigram, wordpiece"):
        check_tokenizer_config(TokenizerConfig(name="sentencepiece"))
    with pytest.raises(XLabError, match="vocab_size=300 is too small; it must be >= 516"):
        check_tokenizer_config(TokenizerConfig(name="wordpiece", vocab_size=300))
    with pytest.raises(XLabError, match="train_docs=0 must be >= 1"):
        check_tokenizer_config(TokenizerConfig(train_docs=0))
