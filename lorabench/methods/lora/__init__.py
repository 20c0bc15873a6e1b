"""LoRA (arXiv 2106.09685): config, layer (with the LoraVariant strategy hook), method."""
from lorabench.methods.lora.config import LoraConfig
from lorabench.methods.lora.layer import LoraLinear, LoraVariant
from lorabench.methods.lora.lora import LoRA

__all__ = ["LoRA", "LoraConfig", "LoraLinear", "LoraVariant"]
