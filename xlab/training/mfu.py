"""Accelerator peak FLOP/s by device name and precision, for model FLOPs utilisation (MFU).

MFU = training FLOPs per token (XLabModel.flops_per_token) x tokens per second per device / the device's dense peak
at the precision the run uses. Figures are the vendors' dense (no sparsity) datasheet numbers. CPUs have no entry:
their "peak" depends on cores, clocks and vector units, so XLab reports tok/s there and MFU as n/a.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), {precision: dense TFLOP/s}); the first match wins, so specific
# names go first. "fp32" is plain fp32 (PyTorch does not use TF32 for matmuls by default).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
)


def device_peak(name: str | None = None, precision: str = "bf16") -> tuple[str, float | None]:
    """(device name, peak FLOP/s at `precision`, or None when unknown, e.g. on CPU) of `name` or this machine."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return name, peaks[precision] * 1e12
    return name, None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one training device at a resolved precision (fp32, bf16, fp16), or None."""
    if device.type != "cuda":
        return None
    return device_peak(torch.cuda.get_device_name(device), str(precision))[1]


def mfu(flops_per_token: float, tokens_per_second_per_device: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_token * tokens_per_second_per_device / peak
