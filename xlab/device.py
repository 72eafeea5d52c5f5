"""The device a command runs on and what it computes in there: one `precision=auto` rule for training, evaluation,
decoding and serving (auto_precision), the autocast context that runs it, and process settings that make CPU work
faster.

keep_freed_memory: glibc's malloc serves every allocation above ~32 MB with a fresh mmap and hands freed heap memory
back to the OS, so each training step page-faults its activations in again: on a 2-core CPU that was ~20% of a bf16
step (benchmarks/train_throughput.py, BENCHMARKS.md). Keeping freed memory in the heap for reuse removes that; the
cost is that the process keeps its peak resident size. This is what jemalloc/tcmalloc, which Intel's PyTorch guides
recommend preloading, achieve, without preloading anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from xlab.errors import XLabError
from xlab.schema import Precision


def cpu_isa() -> str:
    """The widest matmul instructions this CPU has: "AMX", "AVX512-BF16", "AVX512", "AVX2" or "other" (from
    /proc/cpuinfo; "other" where it cannot be read). Benchmarks quote it: speed ratios differ between them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "other"
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return "other"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AMX or AVX512-BF16): there bf16 runs about twice as fast
    as fp32; on AVX2-only CPUs far slower (BENCHMARKS.md)."""
    return cpu_isa() in ("AMX", "AVX512-BF16")


def auto_precision(device: torch.device) -> Precision:
    """The one meaning of `precision=auto` (and decoding's `dtype=auto`), for training, evaluation, generation and
    serving alike: bf16 where the device computes it fast (CUDA GPUs with bf16; CPUs with AMX or AVX512-BF16), fp16
    on CUDA GPUs without bf16, else fp32. Decoding one stream at a time on the AMX VM is the exception where fp32 is
    faster (BENCHMARKS.md, Decoding); one rule keeps every command's numbers comparable, and dtype= overrides it."""
    if device.type == "cuda":
        return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return Precision.bf16
    return Precision.fp32


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """A configured precision on `device`: auto resolved by auto_precision, any other value as it is."""
    p = Precision(precision)
    return auto_precision(device) if p is Precision.auto else p


def accelerate_precision(precision: Precision) -> str:
    """A resolved precision as Accelerate's `mixed_precision` names it."""
    return {Precision.fp32: "no", Precision.bf16: "bf16", Precision.fp16: "fp16"}[precision]


def autocast_for(device: torch.device, precision: Precision) -> Callable[[], AbstractContextManager]:
    """The autocast context a resolved precision runs in (none for fp32)."""
    if precision is Precision.fp32:
        return nullcontext
    dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(name: str) -> torch.device:
    """The torch device `device=` names (auto: cuda when there is one, else cpu), or one line saying why it cannot
    be used here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):  # torch's own message lists every backend it was built to know
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise XLabError(f"device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise XLabError(f"device={name!r}: there is no CUDA device here (torch.cuda.is_available() is False); "
                        "use device=cpu or device=auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise XLabError(f"device={name!r}: there are only {torch.cuda.device_count()} CUDA devices here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise XLabError(f"device={name!r}: MPS is not available here; use device=cpu or device=auto")
    return dev


def task_precision(precision: Precision | str, device: torch.device) -> Precision:
    """Precision of harness scoring: the one rule, except that fp16 is refused (lm-eval's log-likelihoods overflow
    it), so auto on a GPU without bf16 scores in fp32."""
    if Precision(precision) is Precision.fp16:
        raise XLabError(f"precision={str(precision)!r} is not supported with tasks=; valid: auto (bf16 where fast, "
                        "else fp32), fp32, bf16")
    p = resolve_precision(precision, device)
    return Precision.fp32 if p is Precision.fp16 else p


# --- process settings --------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc to serve all allocations from its heap and never trim it. True when applied (Linux with glibc);
    a no-op elsewhere. Idempotent."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _done
