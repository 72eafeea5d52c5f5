"""Expected wall time of one epoch: train tokens x training FLOPs per token / (accelerator peak x utilisation).

The FLOPs per token come from the model itself (`XLabModel.flops_per_token`, built on the meta device, so a 124M
model costs no memory). Peaks are dense bf16 tensor-core figures from the vendors' datasheets; real runs reach a
fraction of them (model FLOPs utilisation, MFU), so the estimate is printed at peak and at ASSUMED_MFU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from xlab.models import MODELS
from xlab.training.mfu import device_peak

ASSUMED_MFU = 0.4  # what a well-tuned single-GPU GPT-2-small run reaches; measure yours from tok_per_s
REFERENCE = ("H100", "A100")


def model_flops_per_token(model_cfg: Any, vocab_size: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters) of the configured model, built without allocating its weights."""

    with torch.device("meta"):
        model = MODELS.get(model_cfg.name)(vocab_size=vocab_size, **asdict(model_cfg))
    return float(model.flops_per_token()), int(model.num_params())


def _hours(seconds: float) -> str:
    if seconds >= 360:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.2g} s"


def epoch_estimate(flops_per_token: float, train_tokens: int, tokens_per_step: int, devices: int = 1,
                   device_name: str | None = None) -> list[str]:
    """Lines describing one epoch over `train_tokens` on `devices` of this machine's accelerator kind."""
    total = flops_per_token * train_tokens
    lines = [f"one epoch = {train_tokens:,} train tokens = {train_tokens / tokens_per_step:,.0f} optimizer steps of "
             f"{tokens_per_step:,} tokens; {flops_per_token:.3g} training FLOPs/token, {total:.3g} FLOPs"]
    name, peak = device_peak(device_name)
    if peak is not None:
        t = total / (peak * devices)
        lines.append(f"on {devices} x {name} ({peak / 1e12:.0f} TFLOPS bf16 peak): {_hours(t)} at peak, "
                     f"{_hours(t / ASSUMED_MFU)} at {ASSUMED_MFU:.0%} MFU")
    else:
        ref = ", ".join(f"{k} {_hours(total / (device_peak(k)[1] * ASSUMED_MFU))}" for k in REFERENCE)
        lines.append(f"{name}: no peak FLOPs known for this device; at {ASSUMED_MFU:.0%} MFU on one GPU: {ref}")
    return lines


# An epoch count past which a small corpus is mostly memorised: val loss typically bottoms out and rises after a few
# epochs without regularisation (the recipe benchmark in BENCHMARKS.md), so the run is warned at start.
MANY_EPOCHS = 4.0
BYTES_SAMPLE = 50_000_000  # tokens read to measure bytes per token of a big split (the first ones)


def warn_many_epochs(max_steps: int, tokens_per_step: int, train_tokens: int) -> float:
    """Epochs the run will make over its train split (steps x tokens per step / train tokens); a warning naming the
    numbers and the remedies when they are more than MANY_EPOCHS."""
    epochs = max_steps * tokens_per_step / max(train_tokens, 1)
    if epochs > MANY_EPOCHS:
        logging.getLogger("xlab.training.trainer").warning(
            "this run makes %.1f epochs over the train split (%d steps x %d tokens / %d train tokens): past ~%g the "
            "model memorises it. Use fewer trainer.max_steps or a smaller model, more data, or "
            "trainer.early_stop_patience; checkpoints/best keeps the lowest-val-loss weights", epochs, max_steps,
            tokens_per_step, train_tokens, MANY_EPOCHS)
    return epochs


def bytes_per_token(tokens: Any, byte_lengths: Any) -> float:
    """Mean UTF-8 bytes per token of a split (its first BYTES_SAMPLE tokens), by the tokenizer's byte table."""
    counts, seen = np.zeros(len(byte_lengths), dtype=np.int64), 0
    for shard in getattr(tokens, "arrays", [tokens]):  # TokenShards: its memmaps, read in place
        part = np.asarray(shard[: BYTES_SAMPLE - seen])
        counts += np.bincount(part, minlength=len(byte_lengths))
        seen += len(part)
        if seen >= BYTES_SAMPLE:
            break
    return float(counts @ byte_lengths) / seen if seen else float("nan")
