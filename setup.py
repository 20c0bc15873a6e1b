"""Build lorabench and its compiled extension lorabench._C.

The C++ kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built with torch's extension tools and
ninja. The CUDA kernels (csrc/cuda/*.cu) are added when torch was built with CUDA and nvcc is
found; with a CPU-only torch the extension is CPU-only and `python -m lorabench env` says so.

Set LORABENCH_NO_EXTENSION=1 to skip the extension entirely: the package then runs on its
pure-PyTorch reference ops (slower, same results).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# No --use_fast_math: its approximate division and square root (DoRA's norms) and flushed denormals would
# void the kernels' bit-exactness and precision claims (tests/kernels). tests/kernels/test_cuda_compile.py
# compiles every .cu with these flags (it reads this literal).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90,code=sm_90"]


def _nvcc_flags():
    """NVCC_FLAGS, or with LORABENCH_CUDA_ARCHS=90 (comma-separated compute capabilities) code for those
    architectures only: tools/gpu_check.sh builds for the local GPU, in half the time."""
    archs = [a.strip() for a in os.environ.get("LORABENCH_CUDA_ARCHS", "").split(",") if a.strip()]
    if not archs:
        return NVCC_FLAGS
    if not all(a.isdigit() for a in archs):
        raise SystemExit(f"LORABENCH_CUDA_ARCHS must be compute capabilities such as 80,90; got {archs}")
    return [f for f in NVCC_FLAGS if not f.startswith("-gencode")] + [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _extensions():
    if os.environ.get("LORABENCH_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "lorabench builds its C++ extension against the installed torch: install torch first "
            "(pip install torch==2.13.0) and build with `pip install --no-build-isolation -e .`, "
            "or set LORABENCH_NO_EXTENSION=1 to install without the extension."
        ) from None
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    # Vectorise for the build machine unless a portable build is asked for (wheels for others).
    if os.environ.get("LORABENCH_PORTABLE") != "1":
        cxx.append("-march=native")
    define_macros = []
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("LORABENCH_FORCE_CPU_EXTENSION") == "1":
        with_cuda = False
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("LORABENCH_WITH_CUDA", None))
        ext = CUDAExtension(
            "lorabench._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": _nvcc_flags(),
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "lorabench._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="lorabench",
    version="0.1.0",
    description="A benchmark of LoRA and its variants: one API, one protocol, real kernels.",
    packages=find_packages(include=["lorabench", "lorabench.*"]),
    package_data={"lorabench": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "pandas",
        "pyyaml",
        "tqdm",
        "numpy",
        "gguf",       # reads the SmolLM2 GGUF file once, to convert it to safetensors
        "accelerate",
        "matplotlib",  # the report's PNG plots (python -m lorabench report)
        "scipy",       # t quantiles and tests of the report (lorabench/report/stats.py)
        "statsmodels",  # Holm's multiple-comparison correction
        "rliable",     # IQM and probability of improvement across tasks (only rliable.metrics is imported)
        "nevergrad==1.0.12",  # LoRAHub's gradient-free search over the adapters' weights (methods/cross_task/lorahub.py)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist",  # README's test command runs one worker per core (pytest.ini)
                 "hypothesis", "pytest-benchmark", "peft", "bitsandbytes", "matplotlib", "lm-eval",
                 "selenium",  # drives Debian's chromium in tests/test_report_browser.py
                 # the clients scenario's tests (tests/test_federated.py)
                 "flwr[simulation]==1.42.0", "ray==2.55.1", "opacus==1.6.0"],
        "lm-eval": ["lm-eval"],
        # `run --backend ray` (docs/scale.md) and its tests: the Ray that flwr[simulation] 1.42 pins, so that
        # the runner and federated rounds share one Ray
        "ray": ["ray[default]==2.55.1"],
        # the clients scenario (lorabench/harness/clients.py): Flower's simulation engine, which runs on Ray;
        # opacus for DP-SGD (ffa-lora's dp_noise_multiplier)
        "federated": ["flwr[simulation]==1.42.0", "ray==2.55.1", "opacus==1.6.0"],
    },
    entry_points={"console_scripts": ["lorabench=lorabench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
