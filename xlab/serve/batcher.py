"""Request batching: one worker thread decodes the rows of concurrent requests together through
xlab.inference.generate_ids.

A request becomes one `Row` per sequence it asks for (each prompt × n). The worker takes the first waiting row,
waits `window_s` for more (and, while fewer rows wait than the last batch had, up to `rejoin_s` for the clients it
just answered to send their next requests), and decodes together every waiting row *compatible* with the first:
- same model and same sampler settings (temperature, top-k, top-p, repetition penalty, ...): one SamplerConfig per
  batch. Stop strings, max_tokens, seed and logprobs are per row, so they do not split batches;
- the batch must not slide its context window: the padded width plus the batch's largest max_tokens stays within
  the model's max_len. A batch slides when its widest row fills the context, which a shorter row alone would not;
- with a repetition penalty, equal prompt lengths only: the penalty sees the left padding of shorter rows;
- beam search rows decode alone (their search is over the row's beams, not tokens of a shared step).
Each row samples from its own generator seeded from its request's seed, so a row's tokens are the ones it gets
alone: the answer does not depend on which requests shared the batch. Rows that arrive while a batch decodes wait
for the next one (no joining mid-decode). A row ends at eos, a stop string, its max_tokens, or when its client
goes away (`cancel`); a batch ends when all its rows have.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xlab.generation.api import cut_at_stop, generate_ids
from xlab.generation.config import SamplerConfig
from xlab.models.ops import attention_dtype


@dataclass
class Served:
    """A loaded checkpoint: what the worker decodes with, as xlab.generate loads it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    decoding: object  # xlab.generation.fast.DecodeOptions


def kv_bytes_per_row(served: Served) -> int:
    """KV-cache bytes of one row at the model's full context: keys and values of every layer, in the dtype
    attention runs in (xlab.models.ops.attention_dtype: fp32 on CPUs whose bf16 is slow)."""
    model = served.model
    c = model.cfg
    dtype = attention_dtype(model.tok_emb.weight.dtype, model.device)
    return 2 * c.n_layer * (c.n_kv_head or c.n_head) * c.max_len * (c.d_model // c.n_head) * dtype.itemsize


class QueueFull(Exception):
    """More rows than max_queued_rows would be waiting or decoding: the request is answered 503, Retry-After."""


@dataclass
class TokenInfo:
    """One generated token for the research view / OpenAI logprobs."""

    token: str  # the token's own text (special tokens by name)
    logprob: float  # under the processed distribution it was chosen from
    top: list[tuple[str, float]]  # the most likely alternatives with finite log-probability, best first


@dataclass
class Row:
    """One sequence a request asked for. `emit(event)` is called from the worker thread with
    ("token", index, text delta, TokenInfo | None) and ("finish", index, text delta, reason, n tokens) events, or
    ("error", index, message)."""

    model: str
    ids: list[int]  # the prompt's token ids (sos is prepended by generate_ids)
    cfg: SamplerConfig  # stop strings are the row's own: cfg.stop stays empty
    max_tokens: int
    seed: int
    stop: list[str]
    logprobs: int | None  # alternatives per token; None = no per-token information
    index: int  # the first choice index it answers
    emit: Callable[[tuple], None]
    echo: bool = False  # with logprobs: the prompt's tokens get theirs too (a "prompt" event first)
    cancelled: bool = False
    finished: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted

    @property
    def key(self) -> tuple:
        return self.model, repr(self.cfg)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` must wait: a split character, or a prefix of a stop string."""
    whole = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, whole), hold, -1):
            if text[:whole].endswith(stop[:k]):
                hold = k
                break
    return len(text) - whole + hold


class Batcher:
    """The worker thread and its queue of rows; `stats` feeds /health."""

    def __init__(self, models: dict[str, Served], window_s: float, max_rows: int, rejoin_s: float = 0.0,
                 max_queued_rows: int | None = None, kv_bytes: float | None = None) -> None:
        self.models, self.window_s, self.max_rows, self.rejoin_s = models, window_s, max_rows, rejoin_s
        self.max_queued_rows = max_queued_rows
        # rows of each model that one batch may hold: max_rows, and as many as kv_bytes of KV cache allow
        self.batch_rows = {name: max(1, min(max_rows, int(kv_bytes // kv_bytes_per_row(served))))
                           if kv_bytes is not None else max_rows for name, served in models.items()}
        self.last_rows = 0  # rows of the last batch: how many clients may be about to come back
        self.queue: queue.Queue[Row] = queue.Queue()
        self.pending: list[Row] = []
        self.lock = threading.Lock()
        self.active = 0  # rows submitted and not finished (queued ones included)
        self.stats = {"batches": 0, "rows": 0, "max_batch_rows": 0, "tokens": 0, "cancelled_rows": 0,
                      "refused_busy": 0}
        self.thread = threading.Thread(target=self.run, name="xlab-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue a request's rows, all or none: QueueFull when they would pass max_queued_rows."""
        with self.lock:
            if self.max_queued_rows is not None and self.active + len(rows) > self.max_queued_rows:
                self.stats["refused_busy"] += 1
                raise QueueFull(f"{self.active} rows are waiting or decoding; this server's limit is "
                                f"max_queued_rows={self.max_queued_rows}")
            self.active += len(rows)
        for row in rows:
            self.queue.put(row)

    def health(self) -> dict:
        with self.lock:
            return {**self.stats, "active_rows": self.active, "batch_rows_limit": self.batch_rows}

    def run(self) -> None:
        while True:
            if not self.pending:
                self.pending.append(self.queue.get())
            self.gather(self.window_s, self.max_rows)
            # The clients the last batch answered send their next requests a few ms later. Waiting (a little) for
            # them keeps concurrent clients in one batch; otherwise they split into two groups that take turns.
            self.gather(self.rejoin_s, min(self.last_rows, self.max_rows))
            batch = self.take_batch()
            if batch:
                self.last_rows = len(batch)
                self.decode(batch)

    def gather(self, wait_s: float, rows: int) -> None:
        """Move queued rows to `pending`, waiting up to wait_s for more while fewer than `rows` are pending."""
        deadline = time.monotonic() + wait_s
        while len(self.pending) < rows and (left := deadline - time.monotonic()) > 0:
            try:
                self.pending.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        while True:  # everything queued meanwhile joins the candidates without waiting
            try:
                self.pending.append(self.queue.get_nowait())
            except queue.Empty:
                break

    def take_batch(self) -> list[Row]:
        """The first pending row and the pending rows compatible with it (module docstring); cancelled rows go."""
        for row in [r for r in self.pending if r.cancelled]:
            self.finish(row, None)
        self.pending = [r for r in self.pending if not r.cancelled]
        if not self.pending:
            return []
        first, batch = self.pending[0], [self.pending[0]]
        if first.cfg.name != "beam" and first.max_tokens > 0:
            max_len, rows = self.models[first.model].model.max_len, self.batch_rows[first.model]
            for row in self.pending[1:]:
                if len(batch) >= rows:
                    break
                candidate = [*batch, row]
                width = 1 + max(len(r.ids) for r in candidate)
                fits = width + max(r.max_tokens for r in candidate) <= max_len
                same_length = first.cfg.repetition_penalty == 1.0 or len(row.ids) == len(first.ids)
                if row.key == first.key and row.max_tokens > 0 and fits and same_length:
                    batch.append(row)
        taken = {id(r) for r in batch}
        self.pending = [r for r in self.pending if id(r) not in taken]
        return batch

    def decode(self, batch: list[Row]) -> None:
        served = self.models[batch[0].model]
        with self.lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(batch))
        for row in batch:
            if row.echo and row.logprobs is not None:
                row.emit(("prompt", row.index, prompt_logprobs(served, row.ids, row.logprobs)))
        if batch[0].max_tokens == 0:  # nothing to decode: OpenAI answers max_tokens=0 with an empty text
            self.finish(batch[0], "length")
            return
        steps = StepLog(served.tokenizer, max((r.logprobs or 0) for r in batch)) if any(
            r.logprobs is not None for r in batch) else None
        on_token = self.token_callback(batch, served, steps)
        try:
            results = generate_ids(
                served.model, served.tokenizer, [r.ids for r in batch], batch[0].cfg, max(r.max_tokens for r in batch),
                [r.seed for r in batch], on_token=None if batch[0].cfg.name == "beam" else on_token,
                decoding=served.decoding, is_done=lambda row, _: batch[row].finished or batch[row].cancelled,
                on_logprobs=steps)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
            for row in batch:
                row.emit(("error", row.index, f"decoding failed: {type(exc).__name__}: {exc}"))
                self.finish(row, None)
            return
        if batch[0].cfg.name == "beam":
            self.finish_beam(batch[0], results, served)
        for row in batch:
            if not row.finished:
                self.finish(row, None if row.cancelled else "length")

    def token_callback(self, batch: list[Row], served: Served, steps: StepLog | None) -> Callable[[int, int], None]:
        tokenizer = served.tokenizer

        def on_token(i: int, token: int) -> None:
            row = batch[i]
            if row.finished or row.cancelled:
                return
            row.tokens.append(token)
            info = steps.info(i, token, row.logprobs) if steps is not None and row.logprobs is not None else None
            text, stopped = cut_at_stop(tokenizer.decode(row.tokens), row.stop)
            reason = "stop" if stopped or token == tokenizer.eos_id else None
            if reason is None and len(row.tokens) >= row.max_tokens:
                reason = "length"
            upto = len(text) if reason else len(text) - held_back(text, row.stop)
            delta, row.sent = text[row.sent:upto], max(row.sent, upto)
            row.emit(("token", row.index, delta, info))  # the last token carries the rest of the text
            if reason:
                self.finish(row, reason, text)

        return on_token

    def finish(self, row: Row, reason: str | None, text: str | None = None) -> None:
        """End a row: emit the rest of its text (cut at a stop string) and why it ended (None: nothing to emit)."""
        if row.finished:
            return
        row.finished = True
        if reason is not None:
            text = text if text is not None else self.models[row.model].tokenizer.decode(row.tokens)
            row.emit(("finish", row.index, text[row.sent:], reason, len(row.tokens)))
        with self.lock:
            self.active -= 1
            self.stats["tokens"] += len(row.tokens)
            self.stats["cancelled_rows"] += row.cancelled

    def finish_beam(self, row: Row, results: list, served: Served) -> None:
        """Beam search yields its sequences at the end: num_return_sequences choices, best first."""
        for k, (_, tokens, _) in enumerate(results):
            text, stopped = cut_at_stop(served.tokenizer.decode(tokens), row.stop)
            ended = stopped or (tokens and tokens[-1] == served.tokenizer.eos_id)
            row.emit(("finish", row.index + k, text, "stop" if ended else "length", len(tokens)))
        row.tokens = list(results[0][1]) if results else []
        self.finish(row, None)


@torch.no_grad()
def prompt_logprobs(served: Served, ids: list[int], k: int) -> list[TokenInfo]:
    """Each prompt token's log-probability given sos and the tokens before it, with the top-k alternatives (echo
    with logprobs: how lm-eval's completions API models score a context's continuation)."""
    x = torch.tensor([[served.tokenizer.sos_id, *ids]], device=served.model.device)
    steps = StepLog(served.tokenizer, k)
    steps(served.model(x)[0, :-1].float().log_softmax(-1))  # one "row" per position
    return [steps.info(i, token, k) for i, token in enumerate(ids)]


class StepLog:
    """The on_logprobs hook: keeps each step's log-probs and their top-k, read back by on_token for its row."""

    def __init__(self, tokenizer, k: int) -> None:
        self.tokenizer, self.k = tokenizer, k
        self.log_probs = self.top_values = self.top_ids = None

    def __call__(self, log_probs: torch.Tensor) -> None:
        self.log_probs = log_probs.float().cpu()
        if self.k:
            self.top_values, self.top_ids = (t.tolist() for t in self.log_probs.topk(self.k, dim=-1))

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def info(self, row: int, token: int, k: int) -> TokenInfo:
        top = []
        if k:
            top = [(self.text(t), v) for t, v in zip(self.top_ids[row][:k], self.top_values[row][:k])
                   if v != float("-inf")]
        return TokenInfo(self.text(token), float(self.log_probs[row, token]), top)
