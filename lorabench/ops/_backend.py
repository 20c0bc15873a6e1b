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


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)  # one call for every device


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast runs a linear layer in on x's device (its "lower precision" policy: bf16 on CPU), or
    None outside autocast. The fused ops are linear layers and follow the same policy: their public functions cast
    x, the bias and the adapter factors to it (casts autograd records, so fp32 master weights get fp32 gradients), as
    F.linear under autocast does; the compiled kernels take one dtype and accumulate bf16 products in fp32."""
    if not _any_autocast():   # ~70 ns: the common case, and a batch-1 GEMV's wrapper cost is counted (docs/kernels.md)
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.is_floating_point() else None


def cast_to(dtype: torch.dtype, *tensors):
    """The tensors in `dtype` (None stays None; one already in it is returned as it is)."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
