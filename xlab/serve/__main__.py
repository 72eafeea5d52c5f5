"""`python -m xlab.serve ckpt=PATH [ckpt2=PATH] [host=127.0.0.1 port=8000 allow_remote=false]`.

Loads the checkpoints as xlab.generate does (dtype/compile/cache), then serves the page at / and the API
(xlab/serve/app.py) until interrupted.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from xlab.checkpoint.read import Checkpoint
from xlab.cli import hydra_app, typed
from xlab.device import pick_device
from xlab.errors import XLabError
from xlab.generation.api import load_for_decoding
from xlab.generation.fast import plan
from xlab.serve.batcher import Served
from xlab.serve.config import ServeConfig

LOOPBACK = {"localhost", "::1", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def checked(cfg: ServeConfig) -> list[Checkpoint]:
    """The host rule, the checkpoints and the device, before any work; the checkpoints, resolved."""
    if not is_loopback(cfg.host) and not cfg.allow_remote:
        raise XLabError(f"host={cfg.host} is not a loopback address: anyone who can reach it could use the server; "
                        "add allow_remote=true to serve it anyway")
    resolved = [Checkpoint(path) for path in (cfg.ckpt, cfg.ckpt2) if path is not None]
    if len(resolved) == 2 and resolved[0].path == resolved[1].path:
        raise XLabError("ckpt2 is the same checkpoint as ckpt: give another one, or leave ckpt2 out")
    plan(cfg.dtype, cfg.compile, cfg.cache, pick_device(cfg.device))
    return resolved


def validate(cfg: DictConfig) -> None:
    checked(typed(cfg))


def task(cfg: ServeConfig) -> None:
    try:
        from xlab.serve.app import serve  # fastapi and uvicorn: the optional `serve` extra
    except ImportError as exc:
        raise XLabError(f"xlab.serve needs the serve extra ({exc.name} is missing): pip install '.[serve]'") from None
    ckpts = checked(cfg)
    if not is_loopback(cfg.host):
        print(f"warning: serving on host={cfg.host} (allow_remote=true): anyone who can reach this address can use "
              "the server; it has no authentication", file=sys.stderr, flush=True)
    serve(load_models(cfg, ckpts), cfg)


def load_models(cfg: ServeConfig, ckpts: list[Checkpoint]) -> dict[str, Served]:
    """Each checkpoint loaded as xlab.generate loads it (load_for_decoding), keyed by the path the API names."""
    device = pick_device(cfg.device)
    models = {}
    for path, ckpt in zip((cfg.ckpt, cfg.ckpt2), ckpts):
        loaded = load_for_decoding(ckpt, device, cfg.dtype, cfg.compile, cfg.cache)
        models[path] = Served(path, loaded.model, loaded.tokenizer, loaded.decoding)
    return models


main = hydra_app("serve", task, ServeConfig, validate)

if __name__ == "__main__":
    main()
