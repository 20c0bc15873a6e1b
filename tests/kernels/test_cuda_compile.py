"""Every csrc/cuda/*.cu compiles standalone with the machine's nvcc for sm_80 and sm_90.

.cu files include only CUDA headers (params struct + host launcher; docs/architecture.md, "Where
things live", a kernel), so this check runs on CPU-only machines too. Skipped, not failed, where nvcc is not on PATH.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC / 'cuda'}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_compiles_for_sm80_and_sm90(cu, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", *ARCHS, f"-I{CSRC}", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_includes_no_torch_headers(cu):
    """The torch binding is separate (csrc/<family>_ops.cpp): a .cu includes CUDA and its own headers."""
    for n, line in enumerate(cu.read_text().splitlines(), 1):
        if line.strip().startswith("#include"):
            assert not any(k in line for k in ("torch/", "ATen/", "c10/", "pybind11")), f"{cu.name}:{n}: {line}"
