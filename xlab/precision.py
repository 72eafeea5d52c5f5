"""What `precision=auto|fp32|bf16|fp16` means on this machine, and the autocast context that runs it.

Shared by training (Accelerate's mixed_precision) and the evaluate command, which must not import the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from xlab.config import Precision


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: Precision | str) -> str:
    """Config precision → Accelerate's mixed_precision ("no", "bf16", "fp16")."""
    p = Precision(precision)
    if p is Precision.auto:
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p.value]


def autocast_for(device: torch.device, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    if mixed_precision == "no":
        return nullcontext
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
