"""LoRA (arXiv 2106.09685): config, layer, method."""
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear
from lorabench.methods.lora.method import LoRA

__all__ = ["LoRA", "LoraConfig", "LoraLinear"]
