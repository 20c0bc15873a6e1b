"""Combining LoRA with other learning paradigms (survey arXiv 2407.11046, "Downstream Adaptation
Improving / Combining with other Learning Paradigms"): Bayesian inference (Laplace-LoRA), active
learning (STAR, with the pool scoring of `active_pool.py`) and prompt matching (PILLOW).
"""
