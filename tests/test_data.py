"""Corpus, split, tokenizer and batching: the data path below the training loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from xlab.data.config import TokenizerConfig
from xlab.data.datamodule import RandomWindows, eval_windows
from xlab.data.pydocs import pydocs_documents
from xlab.data.sources import SPLITS, split_indices
from xlab.data.tokenizer import XLabTokenizer, train_bpe
from xlab.errors import XLabError


@pytest.fixture(scope="module")
def pydocs():
    return pydocs_documents()


def test_pydocs_corpus_is_deterministic_english_text(pydocs):
    ids, texts = pydocs
    assert len(ids) == len(set(ids)) > 500
    assert 1.5e6 < sum(map(len, texts)) < 5e6
    assert any("formatted string literal" in t.lower() for t in texts)
    assert pydocs_documents() == pydocs


def test_split_sizes_disjoint_and_independent_of_row_order():
    ids = [f"doc-{i}" for i in range(400)]
    fractions = [0.9, 0.05, 0.025, 0.025]
    splits = split_indices(ids, fractions, seed=7)
    for name, frac in zip(SPLITS, fractions):
        assert abs(len(splits[name]) - frac * len(ids)) <= 1
    members = {name: {ids[i] for i in idx} for name, idx in splits.items()}
    assert sum(len(m) for m in members.values()) == len(ids) == len(set().union(*members.values()))

    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    again = {name: {shuffled[i] for i in idx} for name, idx in split_indices(shuffled, fractions, 7).items()}
    assert again == members
    other_seed = {name: {ids[i] for i in idx} for name, idx in split_indices(ids, fractions, 8).items()}
    assert other_seed["val"] != members["val"]


def test_bad_split_fractions():
    with pytest.raises(XLabError, match="summing to 1"):
        split_indices(["a", "b"], [0.5, 0.5, 0.5, 0.0], 0)


def test_bpe_tokenizer_round_trip_and_specials(pydocs):
    cfg = TokenizerConfig(vocab_size=600)
    tok = XLabTokenizer(train_bpe(iter(pydocs[1][:50]), cfg), cfg.sos_token, cfg.eos_token, cfg.pad_token,
                        cfg.unk_token)
    assert len(tok) == 600
    assert [tok[t] for t in (tok.sos_token, tok.eos_token, tok.pad_token, tok.unk_token)] == [0, 1, 2, 3]
    text = "Return   the list — naïve café 数字 🙂\n\tend"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text
    assert tok.decode([tok.sos_id, *ids, tok.eos_id]) == text  # specials are dropped when decoding


def test_random_windows_are_seeded_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = RandomWindows(tokens, seq_len=16, batch_size=4, seed=3)
    first = [a.next_batch() for _ in range(3)]
    x, y = first[0]
    assert x.shape == y.shape == (4, 16)
    assert (y[:, :-1] == x[:, 1:]).all() and (y == x + 1).all()  # targets are the inputs shifted by one

    b = RandomWindows(tokens, seq_len=16, batch_size=4, seed=3)
    b.load_state_dict(RandomWindows(tokens, 16, 4, 3).state_dict())
    assert all((b.next_batch()[0] == f[0]).all() for f in first)

    c = RandomWindows(tokens, 16, 4, seed=3)
    c.load_state_dict({"batches_drawn": 2})
    assert (c.next_batch()[0] == first[2][0]).all()
    rank0 = RandomWindows(tokens, 16, 2, seed=3, rank=0, world_size=2).next_batch()[0]
    rank1 = RandomWindows(tokens, 16, 2, seed=3, rank=1, world_size=2).next_batch()[0]
    assert not (rank0 == rank1).all()
    # two processes with batch 2 read exactly what one process with batch 4 reads
    assert torch.equal(torch.cat([rank0, rank1]), first[0][0])


def test_eval_windows_score_each_token_once():
    tokens = np.arange(101, dtype=np.uint16)
    batches = list(eval_windows(tokens, seq_len=10, batch_size=3))
    targets = np.concatenate([y.flatten().numpy() for _, y in batches])
    assert np.array_equal(targets, np.arange(1, 101))
    assert len(list(eval_windows(tokens, 10, 3, max_batches=2))) == 2


def test_corpus_smaller_than_a_window():
    with pytest.raises(XLabError, match="fewer than one window"):
        RandomWindows(np.arange(10, dtype=np.uint16), seq_len=16, batch_size=2, seed=0)
