"""Serving many LoRA adapters from one frozen base model: adapter formats (adapters.py), the LRU
adapter store (store.py) and the multi-adapter model on the BGMV/SGMV ops (model.py)."""
from lorabench.serving.adapters import (LoraAdapter, load_adapter, random_adapter, save_lorabench_adapter,
                                        save_peft_adapter)
from lorabench.serving.model import MultiLoraLinear, MultiLoraModel
from lorabench.serving.store import AdapterStore

__all__ = ["AdapterStore", "LoraAdapter", "MultiLoraLinear", "MultiLoraModel", "load_adapter", "random_adapter",
           "save_lorabench_adapter", "save_peft_adapter"]
