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
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                         "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90"],
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
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "peft", "bitsandbytes", "matplotlib", "lm-eval",
                 "selenium",  # drives Debian's chromium in tests/test_report_browser.py
                 # the clients scenario's tests (tests/test_federated.py)
                 "flwr[simulation]==1.42.0", "ray==2.55.1", "opacus==1.6.0"],
        "lm-eval": ["lm-eval"],
        # the clients scenario (lorabench/harness/clients.py): Flower's simulation engine, which runs on Ray;
        # opacus for DP-SGD (ffa-lora's dp_noise_multiplier)
        "federated": ["flwr[simulation]==1.42.0", "ray==2.55.1", "opacus==1.6.0"],
    },
    entry_points={"console_scripts": ["lorabench=lorabench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
