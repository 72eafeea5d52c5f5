"""ServeConfig: the keys of `python -m xlab.serve` (configs/serve.yaml), its bounds included."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from xlab.generation.config import CacheKind, InferenceDtype
from xlab.schema import AT_LEAST_1, POSITIVE, Range, Schema, Switch


@dataclass
class ServeConfig(Schema):
    """`python -m xlab.serve` (xlab/serve/): a playground page and an OpenAI-compatible completions API over one or
    two checkpoints, decoded as xlab.generate decodes (dtype/compile/cache: GenerateConfig's keys)."""

    ckpt: str = MISSING
    ckpt2: str | None = None  # a second checkpoint: the page shows both side by side; the API's model= picks one
    host: str = "127.0.0.1"
    port: int = 8000
    allow_remote: bool = False  # a host other than loopback serves anyone who can reach it: opt in explicitly
    device: str = "auto"
    dtype: InferenceDtype = InferenceDtype.auto
    compile: Switch = Switch.auto
    cache: CacheKind = CacheKind.auto
    batch_window_ms: float = 5.0  # how long the worker waits for more requests after the first (xlab/serve/batcher.py)
    batch_rejoin_ms: float = 50.0  # at most this long more while fewer rows wait than the last batch decoded
    max_batch_rows: int = 32  # rows decoded together at most
    # Bounds (docs/serving.md: each answered with a 4xx naming it, or 503 + Retry-After when the queue is full)
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1048576  # larger request bodies get 413
    max_request_rows: int = 64  # sequences one request decodes: prompts x n (x num_beams for beam search)
    max_beams: int = 16  # num_beams of a beam-search request
    max_queued_rows: int = 512  # rows waiting or decoding, all requests together: past it new requests get 503
    # KV-cache memory of one batch, all its rows together (computed from the model's shape and dtype): batches are
    # cut to fit, and a request that alone needs more (a wide beam search) is refused
    kv_cache_mb: float = 1024.0
    request_timeout_s: float = 300.0  # a request not finished by then is cancelled and answered 408

    LIMITS = {
        "port": Range(1, 65535), "batch_window_ms": Range(0, 10000), "batch_rejoin_ms": Range(0, 10000),
        "max_batch_rows": Range(1, 4096),
        "max_tokens_limit": AT_LEAST_1, "max_body_bytes": Range(1024), "max_request_rows": AT_LEAST_1,
        "max_beams": AT_LEAST_1, "max_queued_rows": AT_LEAST_1, "kv_cache_mb": POSITIVE, "request_timeout_s": POSITIVE,
    }
