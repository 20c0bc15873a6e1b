"""lorabench: a benchmark of LoRA and its variants (survey arXiv 2407.11046).

One API for every method, one protocol for every trial, real models, real data, real kernels.
Heavy modules (torch, transformers) are imported lazily by the parts that need them.
"""
__version__ = "0.1.0"
