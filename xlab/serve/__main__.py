"""`python -m xlab.serve ckpt=PATH [ckpt2=PATH] [host=127.0.0.1 port=8000 allow_remote=false]`.

Loads the checkpoints as xlab.generate does (dtype/compile/cache), then serves the page at / and the API
(xlab/serve/app.py) until interrupted.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from xlab.cli import hydra_app

LOOPBACK = {"localhost", "::1", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def checked(cfg: DictConfig):
    """The schema's checks (xlab/config.py), the host rule, the checkpoints and the device, before any work."""
    from xlab.checkpoint import resolve_checkpoint
    from xlab.decoding import plan
    from xlab.errors import XLabError
    from xlab.evaluate import pick_device

    cfg = OmegaConf.to_object(cfg)
    if not is_loopback(cfg.host) and not cfg.allow_remote:
        raise XLabError(f"host={cfg.host} is not a loopback address: anyone who can reach it could use the server; "
                        "add allow_remote=true to serve it anyway")
    resolved = [resolve_checkpoint(path) for path in (cfg.ckpt, cfg.ckpt2) if path is not None]
    if len(resolved) == 2 and resolved[0] == resolved[1]:
        raise XLabError("ckpt2 is the same checkpoint as ckpt: give another one, or leave ckpt2 out")
    plan(cfg.dtype, cfg.compile, cfg.cache, pick_device(cfg.device))
    return cfg


def validate(cfg: DictConfig) -> None:
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    checked(cfg)


def load(cfg, path: str, device):
    from xlab.datamodules import XLabDataModule
    from xlab.generate import load_model
    from xlab.serve.batcher import Served

    tokenizer = XLabDataModule.load_from_checkpoint(path).tokenizer
    options = SimpleNamespace(dtype=cfg.dtype, compile=cfg.compile, cache=cfg.cache, draft=None, draft_tokens=4)
    model, decoding = load_model(options, path, device, tokenizer)
    return Served(path, model, tokenizer, decoding)


def task(cfg: DictConfig) -> None:
    from xlab.evaluate import pick_device

    try:
        from xlab.serve.app import serve
    except ImportError as exc:
        from xlab.errors import XLabError

        raise XLabError(f"xlab.serve needs the serve extra ({exc.name} is missing): pip install '.[serve]'") from None
    cfg = checked(cfg)
    if not is_loopback(cfg.host):
        print(f"warning: serving on host={cfg.host} (allow_remote=true): anyone who can reach this address can use "
              "the server; it has no authentication", file=sys.stderr, flush=True)
    device = pick_device(cfg.device)
    models = {path: load(cfg, path, device) for path in (cfg.ckpt, cfg.ckpt2) if path is not None}
    serve(models, cfg)


main = hydra_app("serve", task, validate)

if __name__ == "__main__":
    main()
