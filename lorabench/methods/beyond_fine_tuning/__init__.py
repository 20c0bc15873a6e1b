"""Low-rank adaptation beyond fine-tuning (survey arXiv 2407.11046, "Low-Rank Adaptation / Beyond
Fine-tuning"): long-context LoRA, LongLoRA (`longlora.py`) and SinkLoRA (`sinklora.py`), with one
shared S²-Attn / SF-Attn implementation (`attention.py`) for Llama and BERT models.
"""
