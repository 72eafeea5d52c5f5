"""Speculative decoding (xlab/generation/speculative.py) is exact: greedy output equals the target's greedy output
whatever the draft, and sampled tokens are distributed as the target's (a chi-square test at a fixed seed, which the
draft's own distribution fails)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from xlab.errors import XLabError
from xlab.generation.api import left_pad
from xlab.generation.config import SamplerConfig
from xlab.generation.fast import DecodeOptions
from xlab.generation.sampling import decode_tokens, process
from xlab.generation.speculative import speculative_decode
from xlab.models import XLabModel


def model(seed: int, layers: int, vocab: int = 97, max_len: int = 64, std: float = 0.2) -> XLabModel:
    torch.manual_seed(seed)  # a large init std: peaked next-token distributions, far from uniform
    return XLabModel(vocab, n_layer=layers, n_head=4, d_model=32, max_len=max_len, init_std=std).eval()


def greedy(target, ids, mask, n, decoding=None, min_new=0):
    cfg = SamplerConfig(name="greedy", temperature=0.0, min_new_tokens=min_new, repetition_penalty=1.3)
    decoder = decode_tokens if decoding is None else speculative_decode
    return [s.tokens for s in decoder(target, ids, mask, cfg, n, [1], sampling=False, decoding=decoding)]


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_greedy_output_is_the_targets_whatever_the_draft(draft_tokens):
    target = model(0, 2, max_len=48)
    ids, mask = left_pad([torch.randint(4, 97, (n,)).tolist() for n in (9, 3, 6)], 0, torch.device("cpu"))
    expected = greedy(target, ids, mask, 60, min_new=60)  # past max_len: the window slides
    for draft in (model(1, 1), target):
        options = DecodeOptions(draft=draft, draft_tokens=draft_tokens)
        assert greedy(target, ids, mask, 60, options, min_new=60) == expected
        rate = options.stats["accepted"] / options.stats["drafted"]
        assert rate == 1.0 if draft is target else rate < 1.0, options.stats


def test_greedy_stops_at_eos_like_the_target():
    target, draft = model(0, 2), model(1, 1)
    ids, mask = left_pad([[5, 6, 7]], 0, torch.device("cpu"))
    expected = greedy(target, ids, mask, 30)
    assert greedy(target, ids, mask, 30, DecodeOptions(draft=draft)) == expected


def exact_pair_distribution(target, prompt, cfg) -> torch.Tensor:
    """P(first two tokens = (a, b)) under the target with the sampler's processing, (V, V)."""
    vocab = target.lm_head.out_features
    seqs = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    with torch.no_grad():
        logits = target(seqs)[:, -2:].float()
    first = process(logits[:1, 0], seqs[:1, :-1], 0, cfg, [], True).softmax(-1)[0]
    second = process(logits[:, 1], seqs, 1, cfg, [], True).softmax(-1)
    return first[:, None] * second


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting >= 5 counts (the rest pooled) and its degrees of freedom."""
    expected = probs.flatten() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts.flatten()[big], counts.flatten()[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()), int(big.sum())


def critical(dof: int, z: float = 3.72) -> float:
    """The chi-square quantile at p = 1e-4 (Wilson-Hilferty): a correct sampler fails 1 seed in 10,000."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def near_copy(target: XLabModel, noise: float) -> XLabModel:
    """A draft that agrees with the target often, not always: its weights plus Gaussian noise."""
    draft = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise)
    return draft


def pair_counts(seqs, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab, vocab)
    for s in seqs:
        counts[s.tokens[0], s.tokens[1]] += 1
    return counts


def test_sampled_tokens_are_distributed_as_the_targets():
    vocab, n = 8, 1000
    target = model(0, 2, vocab, std=0.15)
    draft = near_copy(target, 0.05)
    cfg = SamplerConfig(name="top_k", temperature=0.9, top_k=6)
    prompt = torch.tensor([[2, 5, 3]])
    ids, mask = prompt.expand(n, -1), torch.ones(n, 3, dtype=torch.long)
    options = DecodeOptions(draft=draft, draft_tokens=2)
    out = speculative_decode(target, ids, mask, cfg, 3, [], generator=torch.Generator().manual_seed(0),
                             is_done=lambda row, tokens: len(tokens) >= 2, decoding=options)
    exact = exact_pair_distribution(target, prompt, cfg)
    stat, dof = chi_square(pair_counts(out, vocab), exact)
    assert stat < critical(dof), (stat, dof)
    assert 0.2 < options.stats["accepted"] / options.stats["drafted"] < 0.9, options.stats  # both paths taken
    # the test has power: the draft's own distribution, sampled as often, fails it
    drafts = decode_tokens(draft, ids, mask, cfg, 2, [], generator=torch.Generator().manual_seed(0))
    assert chi_square(pair_counts(drafts, vocab), exact)[0] > critical(dof)


def test_a_draft_that_cannot_serve_is_refused():
    target = model(0, 2)
    ids, mask = left_pad([[5, 6]], 0, torch.device("cpu"))
    with pytest.raises(XLabError, match="vocabulary has 50 tokens, the target's 97"):
        greedy(target, ids, mask, 3, DecodeOptions(draft=model(1, 1, vocab=50)))
    with pytest.raises(XLabError, match="not beam"):
        speculative_decode(target, ids, mask, SamplerConfig(name="beam", num_beams=2), 3, [1],
                           decoding=DecodeOptions(draft=target))
