"""The CUDA kernels of csrc/cuda, run on the CPU through ROCm's HIP-CPU (each GPU thread a fiber).

Test-only: `build()` compiles csrc/cuda/*.cu as C++ with LORABENCH_HIPCPU defined (csrc/cuda/runtime.h
then maps the CUDA names onto HIP-CPU, csrc/hipcpu/cuda_compat.h) plus the C entry points of
csrc/hipcpu/capi.cpp into one shared library, called here through ctypes with CPU tensors' pointers.
The functions below mirror the CUDA paths of the torch bindings (csrc/*_ops.cpp): the same kernel
launches with the same arguments, so the tests run the kernels' arithmetic, indexing, bounds and
synchronisation (not their speed, coalescing or data races: HIP-CPU says nothing about those).

HIP-CPU is found at $LORABENCH_HIPCPU or ../shared/third_party/hip-cpu beside the repository; it needs
Debian's libtbb-dev. Objects are cached per source hash under $LORABENCH_HOME/hipcpu, so a rebuild
compiles only what changed (the mutation tests change one .cu at a time).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lorabench.assets.specs import home

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
UNITS = ("cuda/lora.cu", "cuda/bgmv.cu", "cuda/nf4_int4.cu", "hipcpu/capi.cpp")
# -O1: the fibers make -O2's extra speed irrelevant at test sizes and -O1 compiles faster; no FMA
# contraction, so __fmul_rn / __fadd_rn stay single roundings; -w: HIP-CPU's headers warn a lot on g++.
FLAGS = ("-std=c++17", "-O1", "-DNDEBUG", "-fPIC", "-ffp-contract=off", "-DLORABENCH_HIPCPU", "-w", "-pthread")

# lorabench::cuda::DType (csrc/cuda/dtype.h)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def hipcpu_root() -> Path:
    env = os.environ.get("LORABENCH_HIPCPU")
    return Path(env) if env else REPO.parent / "shared" / "third_party" / "hip-cpu"


def why_unavailable() -> str | None:
    """None when the emulated build can be made here, else the reason (a skip message)."""
    root = hipcpu_root()
    if not (root / "include" / "hip" / "hip_runtime.h").is_file():
        return f"HIP-CPU not found at {root} (set LORABENCH_HIPCPU to its checkout)"
    cxx = shutil.which("g++")
    if cxx is None:
        return "g++ is not on PATH"
    probe = subprocess.run([cxx, "-std=c++17", "-x", "c++", "-E", "-", "-o", os.devnull],
                           input="#include <tbb/tbb.h>\n", capture_output=True, text=True)
    if probe.returncode != 0:
        return "libtbb-dev is not installed (HIP-CPU runs blocks through TBB): apt-get install libtbb-dev"
    return None


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(csrc: Path = CSRC, cache: Path | None = None) -> tuple[Path, float]:
    """Compile (or reuse) the library of the kernels under `csrc`; returns its path and the seconds spent
    compiling (0 when everything came from the cache)."""
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    cache = cache or home() / "hipcpu"
    cache.mkdir(parents=True, exist_ok=True)
    include = hipcpu_root() / "include"
    headers = b"".join(p.read_bytes() for d in ("cuda", "hipcpu") for p in sorted((csrc / d).glob("*.h")))
    common = _digest(" ".join(FLAGS).encode(), str(include).encode(), headers)
    objects, todo = [], []
    for unit in UNITS:
        obj = cache / f"{Path(unit).stem}-{_digest(common.encode(), (csrc / unit).read_bytes())}.o"
        objects.append(obj)
        if not obj.exists():
            todo.append((unit, obj))
    start = time.perf_counter()
    jobs = max(1, len(os.sched_getaffinity(0)))
    running: list[tuple[subprocess.Popen, Path, Path, str]] = []

    def wait_one():
        proc, tmp, obj, unit = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"HIP-CPU build of {unit} failed:\n{err[-4000:]}")
        os.replace(tmp, obj)

    for unit, obj in todo:
        if len(running) >= jobs:
            wait_one()
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", *FLAGS, f"-I{include}", "-x", "c++", "-c", str(csrc / unit), "-o", str(tmp)]
        running.append((subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), tmp, obj, unit))
    while running:
        wait_one()
    lib = cache / f"liblorabench_hipcpu-{_digest(*(o.name.encode() for o in objects))}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        out = subprocess.run(["g++", "-shared", "-pthread", "-o", tmp, *map(str, objects), "-ltbb"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"HIP-CPU link failed:\n{out.stderr[-4000:]}")
        os.replace(tmp, lib)
    return lib, time.perf_counter() - start if todo else 0.0


class Kernels:
    """The emulated kernels behind the CUDA bindings' logic, on CPU tensors (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        i64, f64, ci, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
        sig = {
            "lb_dora_norm": [vp] * 6 + [i64] * 3 + [f64, f64, ci],
            "lb_dora_epilogue": [vp] * 4 + [i64, i64, ci, ci],
            "lb_dora_grad": [vp] * 6 + [i64, i64, ci],
            "lb_multi_lora_shrink": [ci, vp, i64, vp, vp, vp, vp, vp, i64, vp, vp, i64, i64, i64, i64],
            "lb_multi_lora_expand": [ci, vp, i64, vp, vp, vp, vp, vp, i64, vp, i64, i64, i64, i64],
            "lb_q4_dequantize": [vp, i64, i64, i64] + [vp] * 6 + [ci, vp, ci],
            "lb_q4_gemv": [vp, i64, i64, i64] + [vp] * 6 + [ci, vp, i64, ci, i64, vp, i64],
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int

    def _call(self, name, *args):
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise RuntimeError(f"{name}: HIP error {code}")

    # --- DoRA (csrc/lora_ops.cpp: dora_norm, dora_epilogue, dora_grad; csrc/cuda/lora.cu) ----------------

    def dora_norm(self, weight, A, B, scale, cancellation=0.5):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        a, b = A.to(acc).contiguous(), B.to(acc).contiguous()
        wa = (weight.to(acc) @ a.T).contiguous()  # (out, r) = W A^T
        bg = (b @ (a @ a.T)).contiguous()  # (out, r) = B (A A^T)
        norm = torch.empty(weight.shape[0], dtype=acc)
        w = weight.contiguous()
        if w.shape[0]:
            self._call("lb_dora_norm", w.data_ptr(), a.data_ptr(), wa.data_ptr(), bg.data_ptr(), b.data_ptr(),
                       norm.data_ptr(), w.shape[0], w.shape[1], b.shape[1], scale, cancellation, DTYPE_CODE[w.dtype])
        return norm

    def dora_epilogue(self, y, u, g, bias, accumulate):
        b = bias.contiguous() if bias is not None else None
        self._call("lb_dora_epilogue", y.data_ptr(), u.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else None,
                   u.shape[0], u.shape[1], int(accumulate), DTYPE_CODE[u.dtype])

    def dora_linear(self, x, weight, bias, A, B, magnitude, scale, mask):
        """The CUDA path of lorabench::dora_linear: (y, xa, u, norm)."""
        norm = self.dora_norm(weight, A, B, scale)
        g = (magnitude.to(norm.dtype) / norm).contiguous()  # eq. (5) of DoRA
        xd = x * mask if mask is not None else x
        xa = xd @ A.T
        u = (xd @ weight.T).contiguous()
        if mask is not None:
            y = (torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T) - u
            y = y.contiguous()
        else:
            y = torch.empty_like(u)
        u.addmm_(xa, B.T, beta=1.0, alpha=scale)
        assert bias is None or bias.dtype == x.dtype, "the binding refuses a bias of another dtype"
        self.dora_epilogue(y, u, g, None if mask is not None else bias, mask is not None)
        return y, xa, u, norm

    def dora_linear_backward(self, dy, x, weight, A, B, magnitude, xa, u, norm, scale, mask, need_dx):
        dy = dy.contiguous()
        u = u.contiguous()
        g = (magnitude.to(norm.dtype) / norm).contiguous()
        du, dm = torch.empty_like(dy), torch.empty_like(norm)
        if dy.shape[1]:
            self._call("lb_dora_grad", dy.data_ptr(), u.data_ptr(), g.data_ptr(), norm.data_ptr(), du.data_ptr(),
                       dm.data_ptr(), dy.shape[0], dy.shape[1], DTYPE_CODE[dy.dtype])
        dxa = (du @ B) * scale
        dB = scale * (du.T @ xa)
        xd = x * mask if mask is not None else x
        dA = dxa.T @ xd
        dmag = dm.to(magnitude.dtype)
        if not need_dx:
            return x.new_empty(0), dA, dB, dmag
        if mask is not None:
            dx = dy @ weight + ((du - dy) @ weight + dxa @ A) * mask
        else:
            dx = du @ weight + dxa @ A
        return dx, dA, dB, dmag

    # --- BGMV / SGMV (csrc/multi_lora_ops.cpp: shrink_cuda, expand_cuda; csrc/cuda/bgmv.cu) --------------

    @staticmethod
    def _slots(idx, seg_starts, seg_idx):
        keep = []
        if idx is not None:
            i = idx.contiguous()
            keep.append(i)
            return keep, (i.data_ptr(), None, None, 0)
        s, si = seg_starts.contiguous(), seg_idx.contiguous()
        keep += [s, si]
        return keep, (None, s.data_ptr(), si.data_ptr(), si.numel())

    def shrink(self, x, A, ranks, scales, idx=None, seg_starts=None, seg_idx=None):
        xr = x if x.stride(-1) == 1 else x.contiguous()
        Ac, r, s = A.contiguous(), ranks.contiguous(), scales.contiguous()
        # SGMV zero-filled, as the binding does (its tiles write the tokens the segments cover)
        y = (torch.empty if idx is not None else torch.zeros)(x.shape[0], A.shape[1], dtype=torch.float32)
        keep, (pi, ps, psi, nseg) = self._slots(idx, seg_starts, seg_idx)
        if idx is None and nseg == 0:
            return y
        self._call("lb_multi_lora_shrink", DTYPE_CODE[A.dtype], xr.data_ptr(), xr.stride(0), y.data_ptr(),
                   Ac.data_ptr(), pi, ps, psi, nseg, r.data_ptr(), s.data_ptr(), x.shape[0], A.shape[0], A.shape[1],
                   A.shape[2])
        return y

    def expand(self, out, y, B, ranks, idx=None, seg_starts=None, seg_idx=None):
        dst = out if out.stride(-1) == 1 else out.contiguous()
        yc, Bc, r = y.contiguous(), B.contiguous(), ranks.contiguous()
        keep, (pi, ps, psi, nseg) = self._slots(idx, seg_starts, seg_idx)
        if idx is None and nseg == 0:
            return out
        self._call("lb_multi_lora_expand", DTYPE_CODE[B.dtype], dst.data_ptr(), dst.stride(0), yc.data_ptr(),
                   Bc.data_ptr(), pi, ps, psi, nseg, r.data_ptr(), out.shape[0], B.shape[0], B.shape[2], B.shape[1])
        if dst.data_ptr() != out.data_ptr():
            out.copy_(dst)
        return out

    # --- NF4 / int4 (csrc/quant_ops.cpp: nf4_params, int4_params, q4_*_cuda; csrc/cuda/nf4_int4.cu) -------

    @staticmethod
    def nf4_params(packed, absmax, absmax2, code2, offset, N, K, blocksize):
        keep = [packed.contiguous()]
        p = dict(packed=keep[0], N=N, K=K, group=blocksize, scale=None, scale_q8=None, scale2=None, code2=None,
                 offset=None, zero=None, int_codes=0)
        if absmax.dtype == torch.uint8:
            p.update(scale_q8=absmax.contiguous(), scale2=absmax2.contiguous(), code2=code2.contiguous(),
                     offset=offset.contiguous())
        else:
            p.update(scale=absmax.contiguous())
        return p

    @staticmethod
    def int4_params(packed, scales, zeros, group):
        return dict(packed=packed.contiguous(), N=packed.shape[0], K=packed.shape[1] * 2, group=group,
                    scale=scales.contiguous(), scale_q8=None, scale2=None, code2=None, offset=None,
                    zero=zeros.contiguous(), int_codes=1)

    @staticmethod
    def _q4_args(p):
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return (ptr(p["packed"]), p["N"], p["K"], p["group"], ptr(p["scale"]), ptr(p["scale_q8"]), ptr(p["scale2"]),
                ptr(p["code2"]), ptr(p["offset"]), ptr(p["zero"]), p["int_codes"])

    def q4_dequantize(self, p, dtype):
        kernel_dtype = torch.float32 if dtype == torch.float64 else dtype
        out = torch.empty(p["N"], p["K"], dtype=kernel_dtype)
        if out.numel():
            self._call("lb_q4_dequantize", *self._q4_args(p), out.data_ptr(), DTYPE_CODE[kernel_dtype])
        return out.to(dtype)

    def q4_gemv(self, p, x):
        """y (fp32) = x W^T by the GEMV kernel (B <= 8 rows, K % 32 == 0)."""
        xc = x.contiguous()
        y = torch.empty(x.shape[0], p["N"], dtype=torch.float32)
        if x.shape[0] and p["N"]:
            self._call("lb_q4_gemv", *self._q4_args(p), xc.data_ptr(), p["K"], DTYPE_CODE[x.dtype], x.shape[0],
                       y.data_ptr(), p["N"])
        return y

    def q4_matmul(self, x, p):
        aligned = p["packed"].data_ptr() % 16 == 0
        if x.shape[0] <= 8 and p["K"] % 32 == 0 and aligned and x.dtype != torch.float64:
            return self.q4_gemv(p, x)
        w = self.q4_dequantize(p, x.dtype)
        if x.dtype == torch.float64:
            return x @ w.T
        return x.float() @ w.float().T  # cuBLAS with an fp32 output: the x-dtype W, fp32 sums, no rounding

    @staticmethod
    def finish(y, x, bias, lora_A, lora_B, scale, pool):
        acc = y.dtype
        if bias is not None:
            y = y + bias.to(acc)
        if lora_A is not None:
            xa = x.to(acc)
            if pool > 1:
                xa = xa.view(x.shape[0], x.shape[1] // pool, pool).mean(-1)
            y = y.addmm(xa @ lora_A.to(acc).T, lora_B.to(acc).T, alpha=scale)
        return y.to(x.dtype)

    def nf4_dequantize(self, packed, absmax, absmax2, code2, offset, shape, blocksize, dtype):
        n = 1
        for s in shape:
            n *= s
        return self.q4_dequantize(self.nf4_params(packed, absmax, absmax2, code2, offset, 1, n, blocksize),
                                  dtype).view(*shape)

    def nf4_linear(self, x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, lora_A, lora_B,
                   scale):
        p = self.nf4_params(packed, absmax, absmax2, code2, offset, out_features, x.shape[1], blocksize)
        return self.finish(self.q4_matmul(x, p), x, bias, lora_A, lora_B, scale, 1)

    def int4_dequantize(self, packed, scales, zeros, group, dtype):
        return self.q4_dequantize(self.int4_params(packed, scales, zeros, group), dtype)

    def int4_linear(self, x, packed, scales, zeros, group, bias, lora_A, lora_B, scale):
        p = self.int4_params(packed, scales, zeros, group)
        pool = group if lora_A is not None and lora_A.shape[1] == p["K"] // group else 1
        return self.finish(self.q4_matmul(x, p), x, bias, lora_A, lora_B, scale, pool)
