"""`python -m xlab.export ckpt=PATH out=DIR`: weights, tokenizer and config only (no optimizer state)."""

from __future__ import annotations

from omegaconf import DictConfig

from xlab.cli import hydra_app


def task(cfg: DictConfig) -> str:
    from xlab.checkpoint import export_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(cfg.ckpt)
    out = export_checkpoint(ckpt, cfg.out or f"{ckpt}-export")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {ckpt} -> {out} ({size / 1e6:.2f} MB)")
    return str(out)


main = hydra_app("export", task)

if __name__ == "__main__":
    main()
