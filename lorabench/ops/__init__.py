"""lorabench kernels: torch.library custom ops in the `lorabench` namespace.

Layout: one module per op family (schema + fake + autograd + public function), the pure-PyTorch
references in `reference.py`, backend discovery in `_backend.py`. Importing this package defines
the ops; the compiled kernels (lorabench._C) register themselves when the extension is present.
"""
from lorabench.ops._backend import available_backends, extension, require_extension
from lorabench.ops.lora import dora_linear, lora_linear

__all__ = ["available_backends", "extension", "require_extension", "dora_linear", "lora_linear"]
