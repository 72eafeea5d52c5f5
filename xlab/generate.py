"""`python -m xlab.generate ckpt=PATH prompt="..." max_new_tokens=50 temperature=1.0 seed=0`."""

from __future__ import annotations

from omegaconf import DictConfig

from xlab.cli import hydra_app


def task(cfg: DictConfig) -> str:
    import torch

    from xlab.datamodules import XLabDataModule
    from xlab.errors import XLabError
    from xlab.evaluate import pick_device
    from xlab.inference import sample
    from xlab.models import XLabModel

    if cfg.max_new_tokens < 0:
        raise XLabError(f"max_new_tokens={cfg.max_new_tokens} must be >= 0")
    device = pick_device(cfg.device)
    tokenizer = XLabDataModule.load_from_checkpoint(cfg.ckpt).tokenizer
    model = XLabModel.load_from_checkpoint(cfg.ckpt, map_location=device).eval().requires_grad_(False)
    inputs = torch.tensor([tokenizer.sos_id, *tokenizer.encode(cfg.prompt)], device=device)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ids = sample(model, inputs, output_length=cfg.max_new_tokens, block_size=model.max_len,
                 eos_class=tokenizer.eos_id, temperature=cfg.temperature, generator=generator)
    text = cfg.prompt + tokenizer.decode(ids)
    print(text)
    return text


main = hydra_app("generate", task)

if __name__ == "__main__":
    main()
