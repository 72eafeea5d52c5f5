"""Process-level settings that make CPU training faster.

glibc's malloc serves every allocation above ~32 MB with a fresh mmap and hands freed heap memory back to the OS,
so each training step page-faults its activations in again: on a 2-core CPU that was ~20% of a bf16 step
(benchmarks/train_throughput.py, BENCHMARKS.md). Keeping freed memory in the heap for reuse removes that; the cost
is that the process keeps its peak resident size. This is what jemalloc/tcmalloc, which Intel's PyTorch guides
recommend preloading, achieve, without preloading anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
