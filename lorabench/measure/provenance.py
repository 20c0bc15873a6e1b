"""Where a result came from: git commit, package versions, machine (docs/architecture.md, "Measurement protocol")."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lorabench", "torch", "transformers", "safetensors", "peft", "bitsandbytes", "lm-eval", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# The instruction sets that decide how fast low precision runs on a CPU: bf16 matmuls need AVX-512 BF16
# (AMD Zen 4+, Intel Cooper Lake+) or AMX (Intel Sapphire Rapids+); without them bf16 is emulated.
CPU_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16"))


@functools.lru_cache(maxsize=None)
def cpu_features() -> dict[str, bool]:
    """{feature name: present} for CPU_FEATURES, from /proc/cpuinfo's flags (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {name: flag in flags for flag, name in CPU_FEATURES}
    except OSError:
        pass
    return {}


def native_bf16() -> bool:
    """True where this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX-BF16): there torch.autocast(bfloat16)
    ran a MiniLM-L6 training step 1.5-2x and a SmolLM2-135M forward 3x faster than fp32; without them bf16 is
    emulated and 7-11x slower (tools/bf16_vs_fp32.py, docs/leaderboard.md)."""
    feats = cpu_features()
    return bool(feats.get("AVX-512 BF16") or feats.get("AMX-BF16"))


@functools.lru_cache(maxsize=None)
def cpu_description() -> str:
    feats = cpu_features()
    extra = ("; " + ", ".join(n if have else f"no {n}" for n, have in feats.items())) if feats else ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores{extra})"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores{extra})"


def gpu_description() -> str | None:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def environment() -> dict:
    import torch
    return {"git_commit": git_commit(), "versions": package_versions(), "cpu": cpu_description(),
            "gpu": gpu_description(), "threads": torch.get_num_threads(), "platform": platform.platform()}
