"""Long-context LoRA: LongLoRA (arXiv 2309.12307) and SinkLoRA (arXiv 2406.05678), one shared
S²-Attn / SF-Attn implementation (`attention.py`) for Llama and BERT models."""
from lorabench.methods.longctx.method import LongLoRA, LongLoRAConfig, SinkLoRA, SinkLoRAConfig

__all__ = ["LongLoRA", "LongLoRAConfig", "SinkLoRA", "SinkLoRAConfig"]
