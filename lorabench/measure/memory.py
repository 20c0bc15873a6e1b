"""Peak memory of the current (trial) process."""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return float("nan")


def cuda_peak_mb() -> dict[str, float] | None:
    import torch
    if not torch.cuda.is_available():
        return None
    return {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "cuda_max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
