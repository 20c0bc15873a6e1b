"""Efficiency: parameter reduction (survey arXiv 2407.11046, section 6.1): freezing part of the
adapter (LoRA-SP, AFLoRA) and dropping backward computation (DropBP).
"""
