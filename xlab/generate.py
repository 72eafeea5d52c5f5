"""`python -m xlab.generate ckpt=PATH prompt="..." max_new_tokens=50 temperature=1.0 seed=0`.

`prompts_from=predict num_prompts=N prompt_tokens=K` instead prompts with the first K tokens of N held-out
documents and writes each sample beside the true continuation (xlab/data/predict.py).
"""

from __future__ import annotations

from pathlib import Path

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
    if cfg.prompts_from is not None:
        return predict_split(cfg)
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


def predict_split(cfg: DictConfig) -> str:
    """Sample a continuation of the first prompt_tokens tokens of num_prompts documents of a split."""
    import torch

    from xlab.checkpoint import resolve_checkpoint
    from xlab.data.predict import Sample, split_prompts, write_samples
    from xlab.datamodules import XLabDataModule
    from xlab.evaluate import pick_device
    from xlab.inference import sample
    from xlab.models import XLabModel

    ckpt = resolve_checkpoint(cfg.ckpt)
    device = pick_device(cfg.device)
    datamodule = XLabDataModule.load_from_checkpoint(ckpt, cache_dir=cfg.paths.cache_dir)
    tokenizer = datamodule.tokenizer
    prompts = split_prompts(datamodule.tokens(cfg.prompts_from), tokenizer, cfg.num_prompts, cfg.prompt_tokens,
                            cfg.max_new_tokens, cfg.prompts_from)
    model = XLabModel.load_from_checkpoint(ckpt, map_location=device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    samples = []
    for p in prompts:
        inputs = torch.tensor([tokenizer.sos_id, *p.prompt_ids], device=device)
        ids = sample(model, inputs, output_length=cfg.max_new_tokens, block_size=model.max_len,
                     eos_class=tokenizer.eos_id, temperature=cfg.temperature, generator=generator)
        samples.append(Sample(p.document, tokenizer.decode(p.prompt_ids), tokenizer.decode(ids),
                              tokenizer.decode(p.true_ids), len(p.prompt_ids), len(ids)))
    prefix = Path(cfg.out) if cfg.out else ckpt / f"samples_{cfg.prompts_from}"
    header = (f"Samples on the {cfg.prompts_from} split of {ckpt} (prompt_tokens={cfg.prompt_tokens}, "
              f"max_new_tokens={cfg.max_new_tokens}, temperature={cfg.temperature}, seed={cfg.seed})")
    jsonl, md = write_samples(samples, prefix, header)
    for s in samples:
        print(f"[{s.document}] {s.prompt!r} -> {s.generated!r} (true: {s.true_continuation!r})")
    print(f"wrote {jsonl} and {md}")
    return str(jsonl)


main = hydra_app("generate", task)

if __name__ == "__main__":
    main()
