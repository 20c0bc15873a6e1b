"""Which kernel backends are available, and why not when they are not.

The compiled extension is optional: importing lorabench never fails because of it. It is loaded
once, lazily; a missing or broken build is diagnosed here and reported by `python -m lorabench env`
and by `require_extension()` at the call that needs it (fails late, with a diagnosis).
"""
from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import lorabench._C (which registers its kernels with torch.library). Returns (module, error)."""
    try:
        mod = importlib.import_module("lorabench._C")
    except ImportError as e:  # not built, or built against another torch
        return None, f"{type(e).__name__}: {e}"
    return mod, None


def extension():
    """The compiled module, or None when it is not built."""
    return _load_extension()[0]


def require_extension():
    mod, err = _load_extension()
    if mod is None:
        raise RuntimeError(
            "lorabench._C (the compiled kernels) is not available: "
            f"{err}. Build it with `pip install --no-build-isolation -e .` (needs a C++ compiler "
            "and ninja), or use backend='reference'."
        )
    return mod


def available_backends() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) for every kernel backend."""
    mod, err = _load_extension()
    out = {"reference": (True, "pure PyTorch, always available")}
    if mod is None:
        out["cpu"] = (False, f"extension not built ({err})")
    else:
        out["cpu"] = (True, f"lorabench._C, SIMD: {getattr(mod, 'simd', '?')}, "
                            f"threads: {torch.get_num_threads()}")
    if mod is None:
        out["cuda"] = (False, "extension not built")
    elif not getattr(mod, "with_cuda", False):
        why = "torch is a CPU build" if torch.version.cuda is None else "built without nvcc"
        out["cuda"] = (False, f"extension built without CUDA ({why})")
    elif not torch.cuda.is_available():
        out["cuda"] = (False, "built with CUDA, but no GPU is visible")
    else:
        out["cuda"] = (True, torch.cuda.get_device_name(0))
    return out
