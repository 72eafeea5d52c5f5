"""The HTTP routes (FastAPI) and the uvicorn server: the playground page, /health, /v1/models, /v1/completions.

Requests are parsed here (the body read with a size cap, then the strict schema of xlab/serve/api.py), turned into
rows, and handed to the single batching worker (xlab/serve/batcher.py); the worker's events come back through an
asyncio queue per request, as one JSON response or as server-sent events (`data: {...}` ... `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from xlab.errors import XLabError
from xlab.serve.api import ApiError, Job, parse_request
from xlab.serve.batcher import Batcher, QueueFull, Served
from xlab.serve.config import ServeConfig


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes. A body up to 8 x limit is read to its end first (and
    dropped): a client still sending when the answer comes would see a broken pipe instead of the 413."""
    too_large = ApiError(413, f"the request body is over this server's limit of {limit} bytes", None,
                         "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > 8 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 8 * limit:
            break
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_large
    return bytes(body)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(models: dict[str, Served], batcher: Batcher, cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="XLab", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("xlab.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), None, kind).body(), status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(models), **batcher.health()}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "xlab", "max_len": served.model.max_len}
            for name, served in models.items()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await read_body(request, cfg.max_body_bytes))
        name = req.model or next(iter(models))
        if name not in models:
            raise ApiError(404, f"model={name!r} is not served here; valid: {', '.join(models)}", "model",
                           "not_found_error")
        job = Job(req, models[name], cfg)
        try:
            batcher.submit(job.rows)
        except QueueFull as exc:
            return JSONResponse(ApiError(503, f"the server is busy: {exc}; retry later", None, "server_busy").body(),
                                status_code=503, headers={"Retry-After": "1"})
        deadline = time.monotonic() + cfg.request_timeout_s
        if req.stream:
            return StreamingResponse(stream(job, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await collect(job, request, deadline)
        finally:
            job.cancel()  # a client that went away, or ran out of time, stops its rows
        if job.error is not None:
            raise ApiError(500, job.error, None, "server_error")
        if job.open:
            raise timed_out(cfg)
        return job.response()

    return app


def timed_out(cfg: ServeConfig) -> ApiError:
    return ApiError(408, f"the request took longer than this server's limit request_timeout_s="
                         f"{cfg.request_timeout_s:g}; ask for fewer tokens or sequences", None, "timeout")


async def collect(job: Job, request: Request, deadline: float, every_s: float = 0.25) -> None:
    """Fold the job's events in until its choices are done, its client has gone (checked every_s) or the deadline
    has passed (the job is then still open)."""
    checked = time.monotonic()
    while job.open and time.monotonic() < deadline:
        try:
            job.apply(await asyncio.wait_for(job.events.get(), timeout=every_s))
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - checked > every_s:
            if await request.is_disconnected():
                return
            checked = time.monotonic()


async def stream(job: Job, deadline: float):
    """Server-sent events for one request; closing the connection cancels its rows (they stop decoding), and so does
    the deadline (an error event says so)."""
    try:
        for chunk in job.echo_chunks():
            yield sse(chunk)
        while job.open and (left := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=left)
            except asyncio.TimeoutError:
                break
            for chunk in job.apply(event):
                yield sse(chunk)
        if job.error is not None:
            yield sse(ApiError(500, job.error, None, "server_error").body())
        elif job.open:
            yield sse(timed_out(job.limits).body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading the models' server, so a taken port is one error line (and no race with uvicorn)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise XLabError(f"cannot listen on host={host} port={port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(models: dict[str, Served], cfg: ServeConfig) -> None:
    import uvicorn  # the optional `serve` extra

    sock = bind(cfg.host, cfg.port)
    batcher = Batcher(models, cfg.batch_window_ms / 1000, cfg.max_batch_rows, cfg.batch_rejoin_ms / 1000,
                      cfg.max_queued_rows, cfg.kv_cache_mb * 1e6)
    app = create_app(models, batcher, cfg)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {', '.join(models)} at http://{shown}:{cfg.port}/ (API: /v1/completions, /v1/models, /health)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
