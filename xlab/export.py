"""`python -m xlab.export ckpt=PATH out=DIR [format=xlab|hf]`.

format=xlab: weights, tokenizer and config only (no optimizer state). format=hf: a transformers model directory
(GPT-2, Llama or Qwen3 class, whichever computes exactly the same function) with its tokenizer files.
"""

from __future__ import annotations

from omegaconf import DictConfig

from xlab.cli import hydra_app


def task(cfg: DictConfig) -> str:
    from xlab.checkpoint import export_checkpoint, resolve_checkpoint
    from xlab.config import ExportFormat

    ckpt = resolve_checkpoint(cfg.ckpt)
    if cfg.format is ExportFormat.hf:
        from xlab.models.hf import export_hf

        out = export_hf(ckpt, cfg.out or f"{ckpt}-hf")
    else:
        out = export_checkpoint(ckpt, cfg.out or f"{ckpt}-export")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"exported {ckpt} -> {out} ({size / 1e6:.2f} MB)")
    return str(out)


main = hydra_app("export", task)

if __name__ == "__main__":
    main()
