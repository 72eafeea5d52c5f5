"""Expected wall time of one epoch: train tokens x training FLOPs per token / (accelerator peak x utilisation).

The FLOPs per token come from the model itself (`XLabModel.flops_per_token`, built on the meta device, so a 124M
model costs no memory). Peaks are dense bf16 tensor-core figures from the vendors' datasheets; real runs reach a
fraction of them (model FLOPs utilisation, MFU), so the estimate is printed at peak and at ASSUMED_MFU.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from xlab.metrics import device_peak

ASSUMED_MFU = 0.4  # what a well-tuned single-GPU GPT-2-small run reaches; measure yours from tok_per_s
REFERENCE = ("H100", "A100")


def model_flops_per_token(model_cfg: Any, vocab_size: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters) of the configured model, built without allocating its weights."""
    import torch

    from xlab.models import MODELS

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
