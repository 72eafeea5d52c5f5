"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a small draft model proposes k tokens one at a
time, the target scores all of them in one forward, and a rejection step keeps the longest prefix the target
agrees with plus one token of its own. Exact: greedy output is the target's greedy output, and sampled tokens are
distributed as the target's (accept x with probability min(1, p(x)/q(x)), else sample from max(0, p - q)).

Both models keep a StaticKVCache over each row's sequence and rewind what the target rejects. Rows decode one at a
time (their acceptances differ, so a batch would leave rows waiting); beam search is not speculative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from xlab.errors import XLabError
from xlab.generation.config import SamplerConfig
from xlab.generation.fast import DecodeOptions, cache_size
from xlab.generation.sampling import Sequence, decode_tokens, process
from xlab.models.transformer import StaticKVCache, XLabModel


def refuse_beam(sampler: str) -> None:
    if sampler == "beam":
        raise XLabError("draft= works with sampler=greedy|multinomial|top_k|top_p, not beam (beam search keeps "
                        "num_beams sequences per step: there is no single continuation to speculate on)")


def check_draft(target: XLabModel, draft: XLabModel) -> None:
    """One clear line for a draft of another vocabulary."""
    v_target, v_draft = target.lm_head.out_features, draft.lm_head.out_features
    if v_target != v_draft:
        raise XLabError(f"the draft's vocabulary has {v_draft} tokens, the target's {v_target}: the draft must "
                        "use the target's tokenizer")


class Cached:
    """One model with a StaticKVCache over a one-row sequence, of which the first `length` tokens are cached."""

    def __init__(self, model: XLabModel, size: int) -> None:
        self.model, self.cache, self.length = model, StaticKVCache(model, 1, size), 0

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """fp32 logits (T, V) after each token of seq (1, L) not yet cached; caches them."""
        out = self.model(seq[:, self.length:], self.cache)[0].float()
        self.length = seq.shape[1]
        return out

    def keep(self, n: int) -> None:
        """Forget all but the first n tokens."""
        if n < self.length:
            self.cache.rewind(self.length - n)
            self.length = n


class Row:
    """The speculative decoding of one prompt: its sequence, both caches, and how to pick a token."""

    def __init__(self, target: XLabModel, prompt: torch.Tensor, padding: torch.Tensor, cfg: SamplerConfig,
                 eos: list[int], total: int, options: DecodeOptions, generator: torch.Generator | None,
                 sampling: bool) -> None:
        self.size = cache_size(min(target.max_len, options.draft.max_len), total)
        self.target, self.draft = Cached(target, self.size), Cached(options.draft, self.size)
        self.seq = prompt[None]  # (1, L): the sequence so far
        self.cfg, self.eos, self.k, self.generator, self.sampling = cfg, eos, options.draft_tokens, generator, sampling
        self.stats, self.prompt_len = options.stats, prompt.numel()
        self.padding = padding[None]  # the row's left padding: the batched samplers' repetition penalty sees it

    def scores(self, logits: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """logits (V,) of the token after seq (1, L) → its processed distribution (probabilities, or one-hot)."""
        seen = torch.cat([self.padding, seq], 1)
        s = process(logits[None], seen, seq.shape[1] - self.prompt_len, self.cfg, self.eos, self.sampling)[0]
        return s.softmax(-1) if self.sampling else torch.nn.functional.one_hot(s.argmax(), s.shape[-1]).float()

    def pick(self, probs: torch.Tensor) -> int:
        if not self.sampling:
            return int(probs.argmax())
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def propose(self, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """k draft tokens after the sequence, one draft forward each; returns the extended sequence and q_1..q_k."""
        ext, qs = self.seq, []
        for _ in range(k):
            q = self.scores(self.draft.logits(ext)[-1], ext)
            qs.append(q)
            ext = torch.cat([ext, ext.new_tensor([[self.pick(q)]])], 1)
        return ext, qs

    def round(self, k: int) -> list[int]:
        """One draft-and-verify round: the tokens it adds (1 to k + 1)."""
        n0 = self.seq.shape[1]
        ext, qs = self.propose(k)
        logits = self.target.logits(ext)[-(k + 1):]
        new = []
        for i, q in enumerate(qs):
            p, x = self.scores(logits[i], ext[:, :n0 + i]), int(ext[0, n0 + i])
            if self.accept(p[x], q[x]):
                new.append(x)
                continue
            new.append(self.pick((p - q).clamp(min=0) if self.sampling else p))
            break
        else:
            new.append(self.pick(self.scores(logits[k], ext)))
        self.stats["drafted"] = self.stats.get("drafted", 0) + k
        self.stats["accepted"] = self.stats.get("accepted", 0) + len(new) - 1
        self.stats["rounds"] = self.stats.get("rounds", 0) + 1
        self.target.keep(n0 + len(new) - 1)  # the last new token is fed next round
        self.draft.keep(n0 + len(new) - 1)
        return new

    def accept(self, p: torch.Tensor, q: torch.Tensor) -> bool:
        if not self.sampling:
            return bool(p > 0)  # p one-hot: the draft's token is the target's argmax
        u = torch.rand(1, generator=self.generator) if self.generator is not None else torch.rand(1)
        return bool(u * q <= p)  # u < p/q without dividing by a q of 0

    def extend(self, tokens: list[int]) -> None:
        self.seq = torch.cat([self.seq, self.seq.new_tensor([tokens])], 1)


@torch.no_grad()
def speculative_decode(
    model: XLabModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
    max_new_tokens: int, eos: list[int], generator: torch.Generator | None = None, sampling: bool = True,
    is_done: Callable[[int, list[int]], bool] | None = None, on_token: Callable[[int, int], None] | None = None,
    decoding: DecodeOptions | None = None,
) -> list[Sequence]:
    """decode_tokens' interface (sampling.py), with decoding.draft proposing decoding.draft_tokens tokens per
    target forward. A row that reaches the end of the cache finishes with plain decoding (its sliding window)."""
    refuse_beam(cfg.name)
    check_draft(model, decoding.draft)
    sampling = sampling and cfg.temperature > 0
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        total = input_ids.shape[1] + max_new_tokens + decoding.draft_tokens + 1
        state = Row(model, input_ids[row][real], input_ids[row][~real], cfg, eos, total, decoding, generator,
                    sampling)

        def done(tokens: list[int], row: int = row) -> bool:
            return tokens[-1] in eos or (is_done is not None and is_done(row, tokens))

        results.append(Sequence(row, decode_row(state, max_new_tokens, done,
                                                lambda t, row=row: on_token and on_token(row, t))))
    return results


def decode_row(state: Row, max_new_tokens: int, done: Callable[[list[int]], bool],
               on_token: Callable[[int], None]) -> list[int]:
    out: list[int] = []
    while len(out) < max_new_tokens:
        # near a full context, plain decoding takes over while the padded row still fits, so its sliding window
        # moves at the same lengths as the batched samplers' (xlab/generation/sampling.py)
        if state.padding.shape[1] + state.seq.shape[1] + state.k + 1 > state.size:
            return out + finish(state, out, max_new_tokens - len(out), done, on_token)
        new = state.round(min(state.k, max_new_tokens - len(out) - 1))
        state.extend(new)
        for token in new:
            out.append(token)
            on_token(token)
            if done(out):
                return out
    return out


def finish(state: Row, out: list[int], n: int, done: Callable[[list[int]], bool],
           on_token: Callable[[int], None]) -> list[int]:
    """The rest of a row with the target alone (decode_tokens), counting min_new_tokens from the start."""
    cfg = replace(state.cfg, min_new_tokens=max(0, state.cfg.min_new_tokens - len(out)))
    seq = torch.cat([state.padding, state.seq], 1)  # as the row stands in its batch: padded on the left
    mask = torch.cat([torch.zeros_like(state.padding), torch.ones_like(state.seq)], 1)
    rest = decode_tokens(state.target.model, seq, mask, cfg, n, state.eos,
                         state.generator, state.sampling, is_done=lambda _, tokens: done(out + tokens),
                         on_token=lambda _, t: on_token(t))
    return rest[0].tokens
