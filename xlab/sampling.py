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

import torch
import torch.nn.functional as F

from xlab.config import SamplerConfig
from xlab.errors import XLabError
from xlab.models.transformer import KVCache, XLabModel
from xlab.registry import Registry


@dataclass
class Sequence:
    row: int  # index of the prompt in the batch
    tokens: list[int]  # generated ids, eos included when produced
    score: float | None = None  # beam: length-normalised log-probability


Decoder = Callable[..., list[Sequence]]
SAMPLERS: Registry[Decoder] = Registry("sampler")
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def check_sampler_config(cfg: SamplerConfig) -> None:
    SAMPLERS.get(cfg.name)
    problems = [
        (cfg.temperature < 0, f"sampler.temperature={cfg.temperature} must be >= 0"),
        (cfg.top_k < 0, f"sampler.top_k={cfg.top_k} must be >= 0 (0 = off)"),
        (not 0 < cfg.top_p <= 1, f"sampler.top_p={cfg.top_p} must be in (0, 1]"),
        (cfg.repetition_penalty <= 0, f"sampler.repetition_penalty={cfg.repetition_penalty} must be > 0"),
        (cfg.min_new_tokens < 0, f"sampler.min_new_tokens={cfg.min_new_tokens} must be >= 0"),
        (cfg.num_beams < 1, f"sampler.num_beams={cfg.num_beams} must be >= 1"),
        (not 1 <= cfg.num_return_sequences <= max(cfg.num_beams, 1) and cfg.name == "beam",
         f"sampler.num_return_sequences={cfg.num_return_sequences} must be in [1, num_beams={cfg.num_beams}]"),
        (str(cfg.early_stopping).lower() not in EARLY_STOPPING,
         f"sampler.early_stopping={cfg.early_stopping!r}; valid: true, false, never"),
    ]
    for bad, message in problems:
        if bad:
            raise XLabError(message)


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
        return self.model(seqs[:, -n_new:], self.cache, window_mask)[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


# --- token-by-token decoding --------------------------------------------------------------------------------------

@torch.no_grad()
def decode_tokens(
    model: XLabModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
    max_new_tokens: int, eos: list[int], generator: torch.Generator | None = None, sampling: bool = True,
    is_done: Callable[[int, list[int]], bool] | None = None, on_token: Callable[[int, int], None] | None = None,
) -> list[Sequence]:
    """Greedy (sampling=False or temperature 0) or sampled decoding of every row; a row stops at eos or when
    is_done(row, tokens) says so (stop strings). on_token(row, id) sees each token as it is chosen (streaming)."""
    sampling = sampling and cfg.temperature > 0
    b = input_ids.shape[0]
    seqs, mask = input_ids, attention_mask
    step = Stepper(model, mask)
    out: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    eos_set = set(eos)
    for n in range(max_new_tokens):
        scores = process(step(seqs, mask), seqs, n, cfg, eos, sampling)
        if sampling:
            probs = scores.softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
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


@torch.no_grad()
def beam_search(
    model: XLabModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplerConfig,
    max_new_tokens: int, eos: list[int], generator: torch.Generator | None = None, **_: object,
) -> list[Sequence]:
    """Beam search with length_penalty, early_stopping (True | False | "never") and num_return_sequences,
    following transformers' GenerationMixin._beam_search step for step, so results match theirs."""
    early_stopping = EARLY_STOPPING[str(cfg.early_stopping).lower()]
    nb, lp = cfg.num_beams, cfg.length_penalty
    b, prompt_len = input_ids.shape
    max_length = prompt_len + max_new_tokens
    device = input_ids.device
    keep = max(2, 1 + len(eos)) * nb  # candidates per step: enough that nb of them do not end in eos
    top_nb = torch.arange(keep, device=device) < nb
    eos_t = torch.tensor(eos, device=device)

    running = input_ids.new_full((b, nb, max_length), eos[0] if eos else 0)
    running[:, :, :prompt_len] = input_ids[:, None]
    sequences = running.clone()
    running_scores = torch.zeros(b, nb, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step one
    beam_scores = torch.full((b, nb), -1e9, device=device)
    finished = torch.zeros(b, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    gen_len = torch.zeros(b, nb, dtype=torch.long, device=device)  # generated length of finished sequences
    running_len = torch.zeros(b, nb, dtype=torch.long, device=device)

    flat_mask = attention_mask.repeat_interleave(nb, dim=0)
    step = Stepper(model, flat_mask)
    cur = prompt_len
    while True:
        flat = running[:, :, :cur].reshape(b * nb, cur)
        mask = torch.cat([flat_mask, flat_mask.new_ones(b * nb, cur - prompt_len)], dim=1)
        log_probs = F.log_softmax(step(flat, mask), dim=-1)
        log_probs = process(log_probs, flat, cur - prompt_len, cfg, eos, sampling=False)
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(b, nb, vocab) + running_scores[:, :, None]).view(b, nb * vocab)
        topk_scores, topk_idx = torch.topk(acc, keep)
        src_beam = topk_idx // vocab
        topk_seqs = _gather(running, src_beam)
        topk_seqs[:, :, cur] = topk_idx % vocab
        topk_len = _gather(running_len, src_beam) + 1
        hits = torch.isin(topk_seqs[:, :, cur], eos_t) | (cur + 1 >= max_length)

        # the best nb candidates that did not stop keep running
        run_scores = topk_scores + hits.float() * -1e9
        nxt = torch.topk(run_scores, nb)[1]
        running, running_scores = _gather(topk_seqs, nxt), _gather(run_scores, nxt)
        running_len = _gather(topk_len, nxt)
        rows = (_gather(src_beam, nxt) + torch.arange(b, device=device)[:, None] * nb).view(-1)

        # candidates among the top nb that stopped join the finished ones if they score better
        just_finished = hits & top_nb[None]
        fin_scores = topk_scores / ((cur + 1 - prompt_len) ** lp)
        full = finished.all(-1, keepdim=True) & (early_stopping is True)
        fin_scores = fin_scores + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_finished) * -1e9
        merged = torch.topk(torch.cat([beam_scores, fin_scores], 1), nb)[1]
        sequences = _gather(torch.cat([sequences, topk_seqs], 1), merged)
        beam_scores = _gather(torch.cat([beam_scores, fin_scores], 1), merged)
        finished = _gather(torch.cat([finished, just_finished], 1), merged)
        gen_len = _gather(torch.cat([gen_len, topk_len], 1), merged)

        step.reorder(rows)
        cur += 1
        best_len = (max_length if early_stopping == "never" and lp > 0 else cur) - prompt_len
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_finished = torch.where(finished, beam_scores.min(1, keepdim=True)[0], -1e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beams = not (bool(finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break

    results = []
    for row in range(b):
        for k in range(cfg.num_return_sequences):
            n = int(gen_len[row, k])
            tokens = sequences[row, k, prompt_len:prompt_len + n].tolist()
            results.append(Sequence(row, tokens, float(beam_scores[row, k])))
    return results


SAMPLERS.register("beam")(beam_search)
