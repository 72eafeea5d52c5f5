"""Decoding algorithms (`sampler.name` in configs/sampler/*.yaml) over XLabModel's KV cache.

Two algorithms serve every sampler: token-by-token selection (greedy, or sampling with temperature → top-k →
top-p, transformers' order) and beam search (a port of transformers' vectorised beam search, so sequences and
scores match `model.generate(num_beams=...)`). Both take a batch of left-padded prompts with an attention mask.

When a sequence fills the model's context (max_len), the window slides: the cache is rebuilt from the last
max_len - 1 tokens and decoding continues, like cropping the input to block_size in uncached sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from xlab.errors import XLabError
from xlab.generation.config import EarlyStopping, SamplerConfig
from xlab.generation.fast import DecodeOptions, StaticStepper
from xlab.models.transformer import KVCache, XLabModel
from xlab.registry import Registry


@dataclass
class Sequence:
    row: int  # index of the prompt in the batch
    tokens: list[int]  # generated ids, eos included when produced
    score: float | None = None  # beam: length-normalised log-probability


Decoder = Callable[..., list[Sequence]]
SAMPLERS: Registry[Decoder] = Registry("sampler")
# EarlyStopping → the value transformers' generate takes
EARLY_STOPPING = {EarlyStopping.true: True, EarlyStopping.false: False, EarlyStopping.never: "never"}


def check_sampler_config(cfg: SamplerConfig) -> None:
    """Beyond the schema's checks (each number's range: xlab/schema.py)."""
    SAMPLERS.get(cfg.name)
    problems = [
        (not 1 <= cfg.num_return_sequences <= max(cfg.num_beams, 1) and cfg.name == "beam",
         f"sampler.num_return_sequences={cfg.num_return_sequences} must be in [1, num_beams={cfg.num_beams}]"),
        (str(cfg.early_stopping).lower() not in EARLY_STOPPING,
         f"sampler.early_stopping={cfg.early_stopping!r}; valid: {', '.join(e.value for e in EarlyStopping)}"),
    ]
    for bad, message in problems:
        if bad:
            raise XLabError(message)


def check_beam_length(cfg: SamplerConfig, max_new_tokens: int) -> None:
    """Beam search ranks continuations, so it needs at least one new token to rank."""
    if cfg.name == "beam" and max_new_tokens < 1:
        raise XLabError(f"max_new_tokens={max_new_tokens} with sampler=beam: beam search needs max_new_tokens >= 1")


# --- logits processors, in transformers' semantics ---------------------------------------------------------------

def repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) scores of tokens already in each sequence by `penalty` (CTRL)."""
    picked = scores.gather(1, seqs)
    return scores.scatter(1, seqs, torch.where(picked < 0, picked * penalty, picked / penalty))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus sampling)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= (1 - p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def process(scores: torch.Tensor, seqs: torch.Tensor, n_new: int, cfg: SamplerConfig, eos: list[int],
            sampling: bool) -> torch.Tensor:
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seqs, cfg.repetition_penalty)
    if n_new < cfg.min_new_tokens and eos:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    if sampling:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k > 0:
            scores = top_k_filter(scores, cfg.top_k)
        if cfg.top_p < 1.0:
            scores = top_p_filter(scores, cfg.top_p)
    return scores


# --- the model step with a sliding window ------------------------------------------------------------------------

class Stepper:
    """Feeds the tokens of a growing batch of sequences through the model with a KV cache. When the context is
    full, the cache is rebuilt from the last max_len - 1 tokens (a sliding window)."""

    def __init__(self, model: XLabModel, mask: torch.Tensor) -> None:
        self.model = model
        self.cache = KVCache(model, mask.shape[0])
        self.start = 0  # column of the sequences where the cached window begins
        self.padded = not bool(mask.all())  # left padding: the model needs the mask to place positions

    def __call__(self, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, V), in fp32, of the token after each row of `seqs` (B, T)."""
        n_new = seqs.shape[1] - self.start - self.cache.length
        if self.cache.length + n_new > self.model.max_len:
            self.start = seqs.shape[1] - (self.model.max_len - 1)
            self.cache = KVCache(self.model, seqs.shape[0])
            n_new = self.model.max_len - 1
        window_mask = mask[:, self.start:] if self.padded else None
        # the head on the last position only: a prefill of a long prompt would otherwise compute logits per token
        return self.model.head(self.model.hidden(seqs[:, -n_new:], self.cache, window_mask)[:, -1]).float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


def make_stepper(model: XLabModel, mask: torch.Tensor, max_new_tokens: int,
                 decoding: DecodeOptions | None) -> Stepper | StaticStepper:
    """The static-cache stepper (xlab/generation/fast.py) unless decoding.static is off; None = the dynamic cache."""
    if decoding is None or not decoding.static:
        return Stepper(model, mask)
    return StaticStepper(model, mask, mask.shape[1] + max_new_tokens, decoding)


# --- token-by-token decoding --------------------------------------------------------------------------------------

def draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row of probs (B, V); a list of generators draws row i from generator i (alone, a row's draw
    is then the one a batch of that row would make with that generator)."""
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def decode_tokens(
    model: XLabModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
    max_new_tokens: int, eos: list[int], generator: torch.Generator | list[torch.Generator] | None = None,
    sampling: bool = True, is_done: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None, decoding: DecodeOptions | None = None,
    on_logprobs: Callable[[torch.Tensor], None] | None = None,
) -> list[Sequence]:
    """Greedy (sampling=False or temperature 0) or sampled decoding of every row; a row stops at eos or when
    is_done(row, tokens) says so (stop strings). on_token(row, id) sees each token as it is chosen (streaming).
    generator may be a list, one per row: each row then draws from its own stream, so its tokens do not depend on
    which rows share the batch. on_logprobs(log_probs) sees each step's (B, V) log-probabilities after the logits
    processors (what the token is chosen from), before on_token: token log-probs and alternatives (xlab/serve)."""
    sampling = sampling and cfg.temperature > 0
    b = input_ids.shape[0]
    seqs, mask = input_ids, attention_mask
    step = make_stepper(model, mask, max_new_tokens, decoding)
    out: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    eos_set = set(eos)
    for n in range(max_new_tokens):
        scores = process(step(seqs, mask), seqs, n, cfg, eos, sampling)
        if on_logprobs is not None:
            on_logprobs(scores.log_softmax(-1))
        if sampling:
            nxt = draw(scores.softmax(-1).cpu(), generator)
        else:
            nxt = scores.argmax(-1).cpu()
        for row, token in enumerate(nxt.tolist()):
            if finished[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token in eos_set or (is_done is not None and is_done(row, out[row])):
                finished[row] = True
        if all(finished):
            break
        # finished rows keep decoding (their tokens are dropped): batch shapes stay fixed
        seqs = torch.cat([seqs, nxt[:, None].to(seqs.device)], dim=1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
    return [Sequence(row, tokens) for row, tokens in enumerate(out)]


SAMPLERS.register("greedy")(lambda *a, **kw: decode_tokens(*a, **{**kw, "sampling": False}))
for _name in ("multinomial", "top_k", "top_p"):  # one algorithm; the configs differ in their filters
    SAMPLERS.register(_name)(decode_tokens)


# --- beam search (transformers' algorithm) ------------------------------------------------------------------------

def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) indexed by idx (B, K') along dim 1."""
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


class _Candidates(NamedTuple):
    """The `keep` best one-token extensions of the running beams at one step, (B, keep, ...)."""

    scores: torch.Tensor  # summed log-probabilities
    src_beam: torch.Tensor  # the running beam each extends
    seqs: torch.Tensor  # the running beam with the new token written at column `cur`
    lengths: torch.Tensor  # generated lengths, the new token included
    hits: torch.Tensor  # ended in eos or reached max_length


@dataclass
class _BeamSearch:
    """Settings and state of one batch's beam search, tensors shaped (B, num_beams, ...) as in transformers'
    vectorised _beam_search, whose steps the methods follow in order."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str  # True | False | "never"
    prompt_len: int
    max_length: int  # prompt plus max_new_tokens
    eos: torch.Tensor
    keep: int  # candidates per step: enough that num_beams of them do not end in eos
    running: torch.Tensor  # open beams (B, nb, max_length)
    running_scores: torch.Tensor  # their summed log-probabilities
    running_len: torch.Tensor  # their generated lengths
    sequences: torch.Tensor  # finished sequences (B, nb, max_length), best first
    beam_scores: torch.Tensor  # their length-normalised scores
    finished: torch.Tensor  # whether a slot of `sequences` holds a finished sequence
    gen_len: torch.Tensor  # their generated lengths
    improvable: torch.Tensor  # (B, 1): an open beam may still beat the finished ones

    @classmethod
    def start(cls, input_ids: torch.Tensor, cfg: SamplerConfig, max_new_tokens: int, eos: list[int]) -> _BeamSearch:
        nb = cfg.num_beams
        b, prompt_len = input_ids.shape
        max_length = prompt_len + max_new_tokens
        device = input_ids.device
        running = input_ids.new_full((b, nb, max_length), eos[0] if eos else 0)
        running[:, :, :prompt_len] = input_ids[:, None]
        running_scores = torch.zeros(b, nb, device=device)
        running_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step one
        return cls(
            num_beams=nb, length_penalty=cfg.length_penalty,
            early_stopping=EARLY_STOPPING[str(cfg.early_stopping).lower()],
            prompt_len=prompt_len, max_length=max_length, eos=torch.tensor(eos, device=device),
            keep=max(2, 1 + len(eos)) * nb,
            running=running, running_scores=running_scores,
            running_len=torch.zeros(b, nb, dtype=torch.long, device=device),
            sequences=running.clone(), beam_scores=torch.full((b, nb), -1e9, device=device),
            finished=torch.zeros(b, nb, dtype=torch.bool, device=device),
            gen_len=torch.zeros(b, nb, dtype=torch.long, device=device),
            improvable=torch.ones(b, 1, dtype=torch.bool, device=device),
        )

    def candidates(self, log_probs: torch.Tensor, cur: int) -> _Candidates:
        """The best `keep` extensions of the running beams, given next-token log_probs (B * nb, V)."""
        b, nb = self.running.shape[:2]
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(b, nb, vocab) + self.running_scores[:, :, None]).view(b, nb * vocab)
        scores, idx = torch.topk(acc, self.keep)
        src_beam = idx // vocab
        seqs = _gather(self.running, src_beam)
        seqs[:, :, cur] = idx % vocab
        lengths = _gather(self.running_len, src_beam) + 1
        hits = torch.isin(seqs[:, :, cur], self.eos) | (cur + 1 >= self.max_length)
        return _Candidates(scores, src_beam, seqs, lengths, hits)

    def select_running(self, c: _Candidates) -> torch.Tensor:
        """Keep the best num_beams candidates that did not stop running; returns the flat (B * nb) indices of
        their source beams, to reorder the KV cache by."""
        b, nb = self.running.shape[:2]
        run_scores = c.scores + c.hits.float() * -1e9
        nxt = torch.topk(run_scores, nb)[1]
        self.running, self.running_scores = _gather(c.seqs, nxt), _gather(run_scores, nxt)
        self.running_len = _gather(c.lengths, nxt)
        return (_gather(c.src_beam, nxt) + torch.arange(b, device=nxt.device)[:, None] * nb).view(-1)

    def merge_finished(self, c: _Candidates, cur: int) -> None:
        """Candidates among the top num_beams that stopped join the finished ones if they score better."""
        top_nb = torch.arange(self.keep, device=c.scores.device) < self.num_beams
        just_finished = c.hits & top_nb[None]
        fin_scores = c.scores / ((cur + 1 - self.prompt_len) ** self.length_penalty)
        # early_stopping=True: a batch row with num_beams finished sequences takes no more
        full = self.finished.all(-1, keepdim=True) & (self.early_stopping is True)
        fin_scores = fin_scores + full.float() * -1e9 + (~self.improvable).float() * -1e9 + (~just_finished) * -1e9
        merged = torch.topk(torch.cat([self.beam_scores, fin_scores], 1), self.num_beams)[1]
        self.sequences = _gather(torch.cat([self.sequences, c.seqs], 1), merged)
        self.beam_scores = _gather(torch.cat([self.beam_scores, fin_scores], 1), merged)
        self.finished = _gather(torch.cat([self.finished, just_finished], 1), merged)
        self.gen_len = _gather(torch.cat([self.gen_len, c.lengths], 1), merged)

    def should_stop(self, cur: int, hits: torch.Tensor) -> bool:
        """Update which rows can still improve, now that `cur` columns are filled; True when the search is over."""
        lp = self.length_penalty
        # "never" with a positive length penalty: judge the best beam at the longest length it could reach
        best_len = (self.max_length if self.early_stopping == "never" and lp > 0 else cur) - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_len ** lp)
        worst_finished = torch.where(self.finished, self.beam_scores.min(1, keepdim=True)[0], -1e9)
        self.improvable = self.improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beams = not (bool(self.finished.all()) and self.early_stopping is True)
        return not (bool(self.improvable.any()) and open_beams and not bool(hits.all()))

    def results(self, num_return_sequences: int) -> list[Sequence]:
        """The best num_return_sequences finished sequences of each row, generated tokens only."""
        out = []
        for row in range(self.sequences.shape[0]):
            for k in range(num_return_sequences):
                n = int(self.gen_len[row, k])
                tokens = self.sequences[row, k, self.prompt_len:self.prompt_len + n].tolist()
                out.append(Sequence(row, tokens, float(self.beam_scores[row, k])))
        return out


@torch.no_grad()
def beam_search(
    model: XLabModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
    max_new_tokens: int, eos: list[int], generator: torch.Generator | None = None,
    decoding: DecodeOptions | None = None, **_: object,
) -> list[Sequence]:
    """Beam search with length_penalty, early_stopping (True | False | "never") and num_return_sequences,
    following transformers' GenerationMixin._beam_search step for step, so results match theirs."""
    search = _BeamSearch.start(input_ids, cfg, max_new_tokens, eos)
    b, prompt_len = input_ids.shape
    flat_mask = attention_mask.repeat_interleave(cfg.num_beams, dim=0)
    step = make_stepper(model, flat_mask, max_new_tokens, decoding)
    cur = prompt_len  # columns filled so far
    while True:
        flat = search.running[:, :, :cur].reshape(b * cfg.num_beams, cur)
        mask = torch.cat([flat_mask, flat_mask.new_ones(flat.shape[0], cur - prompt_len)], dim=1)
        log_probs = F.log_softmax(step(flat, mask), dim=-1)
        log_probs = process(log_probs, flat, cur - prompt_len, cfg, eos, sampling=False)
        candidates = search.candidates(log_probs, cur)
        step.reorder(search.select_running(candidates))
        search.merge_finished(candidates, cur)
        cur += 1
        if search.should_stop(cur, candidates.hits):
            break
    return search.results(cfg.num_return_sequences)


SAMPLERS.register("beam")(beam_search)
