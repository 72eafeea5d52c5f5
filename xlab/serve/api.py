"""The OpenAI-compatible completions API: the request schema, its checks, and the response objects.

Fields follow OpenAI's legacy `POST /v1/completions` (prompt, max_tokens, temperature, top_p, n, stop, seed,
logprobs, echo, stream); XLab adds `sampler` (greedy | multinomial | top_k | top_p | beam, with the defaults of
configs/sampler/<name>.yaml), `top_k`, `repetition_penalty` and `num_beams`. Unknown fields and values of the
wrong JSON type are refused (strict), so a typo never silently falls back to a default. Every refusal is a 4xx
`{"error": {"message", "type", "param"}}` whose param names the field.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xlab.cli import CONFIG_DIR
from xlab.errors import XLabError
from xlab.generation.config import SamplerConfig
from xlab.generation.sampling import check_beam_length, check_sampler_config
from xlab.serve.batcher import Row, Served, TokenInfo, kv_bytes_per_row
from xlab.serve.config import ServeConfig

MAX_PROMPTS = 64  # prompts in one request
MAX_N = 16  # choices per prompt
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop strings per request, characters per stop string
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's own limit is 5)


class Sampler(str, Enum):
    greedy = "greedy"
    multinomial = "multinomial"
    top_k = "top_k"
    top_p = "top_p"
    beam = "beam"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # a name GET /v1/models lists; None = the first checkpoint
    prompt: str | list[str] | list[int] | list[list[int]]  # texts, or token ids (as lm-eval's API models send)
    max_tokens: int = Field(16, ge=0)
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    sampler: Sampler | None = None  # None: greedy at temperature 0, else multinomial (with any top_k/top_p)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    user: str | None = None  # accepted for OpenAI clients; unused


def parse_request(body: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


def from_validation(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = err.get("loc", ())
    if err["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return ApiError(400, f"the body must be a JSON object ({err['msg']})")
    param = str(loc[0])
    if err["type"] == "extra_forbidden":
        valid = ", ".join(CompletionRequest.model_fields)
        return ApiError(400, f"unknown field {param!r}; valid: {valid}", param)
    if param == "prompt" and len(loc) > 1 and err["type"] in ("string_type", "list_type", "int_type"):
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such "
                             "lists", param)
    got = err.get("input")
    shown = f" (got {got!r})" if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 60 else ""
    return ApiError(400, f"{param}: {err['msg']}{shown}", param)


@cache
def sampler_defaults(name: str) -> dict:
    """What configs/sampler/<name>.yaml sets, so `sampler=top_k` means what it means to xlab.generate."""


    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "sampler" / f"{name}.yaml"))


def sampler_config(req: CompletionRequest) -> SamplerConfig:
    name = req.sampler.value if req.sampler else ("greedy" if req.temperature == 0 else "multinomial")
    options = {k: getattr(req, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "num_beams")
               if getattr(req, k) is not None}
    if name == "greedy":
        options.pop("temperature", None)
    if name == "beam":
        options["num_return_sequences"] = req.n
        if req.logprobs is not None:
            raise ApiError(400, "logprobs is not available with sampler=beam", "logprobs")
    try:
        cfg = SamplerConfig(**{**sampler_defaults(name), **options})
        check_sampler_config(cfg)
        check_beam_length(cfg, req.max_tokens)
    except XLabError as exc:
        message = str(exc).replace("sampler.", "")
        key = message.split("=")[0].split()[0]
        param = {"num_return_sequences": "n"}.get(key, key if key in CompletionRequest.model_fields else None)
        raise ApiError(400, message, param) from None
    return cfg


def stops(req: CompletionRequest) -> list[str]:
    """The stop strings: at most MAX_STOPS, each non-empty and at most MAX_STOP_CHARS long (every generated token
    is checked against each of them, so their size is a bound on the work per token)."""
    values = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(values) > MAX_STOPS or not all(values) or max(map(len, values), default=0) > MAX_STOP_CHARS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, each at most "
                            f"{MAX_STOP_CHARS} characters", "stop")
    return values


def check_size(req: CompletionRequest, cfg: SamplerConfig, prompts: int, served: Served, limits: ServeConfig) -> None:
    """The request's own bounds: tokens, sequences decoded, beams and the KV cache they need (ServeConfig)."""
    if req.max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens={req.max_tokens} is above this server's limit max_tokens_limit="
                            f"{limits.max_tokens_limit}", "max_tokens")
    beam = cfg.name == "beam"
    if beam and cfg.num_beams > limits.max_beams:
        raise ApiError(400, f"num_beams={cfg.num_beams} is above this server's limit max_beams={limits.max_beams}",
                       "num_beams")
    per_prompt = cfg.num_beams if beam else req.n
    if prompts * per_prompt > limits.max_request_rows:
        what = f"{prompts} prompt(s) x {'num_beams' if beam else 'n'}={per_prompt}"
        raise ApiError(400, f"this request decodes {prompts * per_prompt} sequences ({what}); this server's limit is "
                            f"max_request_rows={limits.max_request_rows}", "num_beams" if beam else "n")
    at_once = per_prompt if beam else 1  # a beam search decodes its beams together
    if (need := kv_bytes_per_row(served) * at_once) > limits.kv_cache_mb * 1e6:
        raise ApiError(400, f"this request needs {need / 1e6:.0f} MB of KV cache at once ({at_once} row(s) of the "
                            f"model's context); this server's limit is kv_cache_mb={limits.kv_cache_mb:g}",
                       "num_beams" if beam else None)


@dataclass
class ChoiceState:
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class Job:
    """One request: its rows for the batcher and what their events add up to (a response or stream chunks)."""

    def __init__(self, req: CompletionRequest, served: Served, limits: ServeConfig) -> None:
        self.req, self.served, self.limits = req, served, limits
        self.id, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.error: str | None = None
        cfg, stop = sampler_config(req), stops(req)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one text, or one prompt's token ids
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ApiError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", "prompt")
        check_size(req, cfg, len(prompts), served, limits)
        ids = [self.encode(p) for p in prompts]
        self.prompts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in prompts]  # what echo shows
        per_prompt = 1 if cfg.name == "beam" else req.n  # beam: one row returns n sequences
        base_seed = req.seed if req.seed is not None else random.getrandbits(32)
        self.rows = [Row(served.name, ids[p], cfg, req.max_tokens, base_seed + j, stop, req.logprobs,
                         p * req.n + j, self.emit, echo=req.echo)
                     for p in range(len(self.prompts)) for j in range(per_prompt)]
        self.choices = [ChoiceState() for _ in range(len(self.prompts) * req.n)]
        self.prompt_tokens = sum(len(i) for i in ids) * req.n
        self.open = len(self.choices)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.served.tokenizer.encode(prompt)
        else:
            vocab = len(self.served.tokenizer)
            if not prompt or not all(0 <= i < vocab for i in prompt):
                raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})", "prompt")
            ids = list(prompt)
        room = self.served.model.max_len - 2  # sos and one new token must fit in the context
        if len(ids) > room:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context holds at most {room} "
                                f"(max_len={self.served.model.max_len}, sos included)", "prompt")
        return ids

    def emit(self, event: tuple) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server is shutting down: its event loop is closed, nobody waits for the event
            self.cancel()

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True

    def prefix(self, index: int) -> str:
        return self.prompts[index // self.req.n] if self.req.echo else ""

    def apply(self, event: tuple) -> list[dict]:
        """Fold one event in; returns the stream chunks it makes."""
        kind, index = event[0], event[1]
        if kind == "error":
            self.error, self.open = event[2], 0
            return []
        state = self.choices[index]
        chunks = []
        if kind == "prompt":  # echo with logprobs: the prompt's own tokens come first, at their offsets
            infos = event[2]
            offsets = list(itertools.accumulate((len(t.token) for t in infos[:-1]), initial=0))
            state.tokens += infos
            state.offsets += offsets
            chunks.append(self.chunk(index, "", None, logprobs_object(infos, offsets)))
        elif kind == "token":
            _, _, delta, info = event
            offset = len(self.prefix(index)) + len(state.text)
            if info is not None:
                state.tokens.append(info)
                state.offsets.append(offset)
            state.text += delta
            chunks.append(self.chunk(index, delta, None, logprobs_object([info], [offset]) if info else None))
        else:
            _, _, delta, reason, count = event
            state.text += delta
            state.finish_reason, state.completion_tokens = reason, count
            self.open -= 1
            chunks.append(self.chunk(index, delta, reason, None))
        return chunks

    def chunk(self, index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        return self.envelope([choice])

    def echo_chunks(self) -> list[dict]:
        return [self.envelope([{"text": self.prefix(i), "index": i, "logprobs": None, "finish_reason": None}])
                for i in range(len(self.choices))] if self.req.echo else []

    def envelope(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.served.name,
                "choices": choices}

    def response(self) -> dict:
        choices = []
        for i, state in enumerate(self.choices):
            logprobs = logprobs_object(state.tokens, state.offsets) if self.req.logprobs is not None else None
            choices.append({"text": self.prefix(i) + state.text, "index": i, "logprobs": logprobs,
                            "finish_reason": state.finish_reason})
        completion = sum(s.completion_tokens for s in self.choices)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        return {**self.envelope(choices), "usage": usage}


def logprobs_object(tokens: list[TokenInfo], offsets: list[int]) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists per token."""
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}
