"""Pure-PyTorch reference implementations of every lorabench op.

Each function reads like the equation of its paper; every backend is tested against these.
They are also the fallback when the compiled extension is not built.
"""
from __future__ import annotations

import torch
