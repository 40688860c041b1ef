"""Keep freed CPU memory in the process for reuse: 1.25-1.65x faster CPU steps on Linux.

Example:
    >>> from leworld.allocator import keep_freed_memory
    >>> keep_freed_memory()  # True on Linux with glibc, False (and nothing changed) elsewhere
    True

Why: glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB by
default) with fresh pages from the kernel and unmaps them again on free, and it hands the top
of its heap back to the kernel once more than the trim threshold is free. A CPU training step
allocates and frees many tensors of that size (SIGReg's (T, K, J, B) = (4, 1024, 17, 128)
float32 arrays are 36 MiB, a CNN's activations at batch 128 x 4 frames more), so every such op
first page-faults its output in: on a 2-core CPU a Push-T tiny training step took 480-488 ms
with glibc's defaults and 293-320 ms with both thresholds raised (`docs/benchmarks.md`).

`keep_freed_memory` raises both thresholds with `mallopt`, so freed blocks stay in the heap and
are reused. The numbers computed do not change. The price is memory: the process keeps what it
freed, and blocks freed at one size are not always reused at another (peak RSS 1.3 instead of
1.2 GiB in that benchmark, 2.6 instead of 1.7 GiB for a 50-env `plan.py` run). The entry points
that run the network (`train.py`, `plan.py`, `surprise.py`, `python -m leworld.probe / forecast /
separation / recalibrate` and the CPU benchmarks) call it first. It does nothing when:

- the platform is not Linux with glibc (macOS, Windows, musl);
- `LEWORLD_KEEP_FREED_MEMORY=0` is set;
- the user already chose, with `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the
  environment or another allocator (jemalloc, tcmalloc, mimalloc) in `LD_PRELOAD`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
THRESHOLD = 1 << 30  # 1 GiB: larger than any tensor a CPU preset frees every step
OPT_OUT = "LEWORLD_KEEP_FREED_MEMORY"


def keep_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to `threshold` bytes; True when applied."""
    if not 0 < threshold < 2**31:
        raise ValueError(f"threshold must be a positive int below 2**31 bytes (mallopt takes an int), got {threshold}")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    value = ctypes.c_int(threshold)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(M_TRIM_THRESHOLD, value))
