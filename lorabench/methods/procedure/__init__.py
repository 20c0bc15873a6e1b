"""Optimizing the learning procedure (survey arXiv 2407.11046, section 4.3): regularisers and
residual paths that change how LoRA learns, not what it can represent (LoRA Dropout, SIBO, ...).
"""
