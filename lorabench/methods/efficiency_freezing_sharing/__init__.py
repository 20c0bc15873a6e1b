"""Efficiency: parameter freezing and sharing (survey arXiv 2407.11046, "Efficiency Improving /
Parameter Reduction / Parameter Freezing" and "Parameter Sharing"): training part of the adapter
(LoRA-FA, LoRA-SP, AFLoRA, LoRA-XS, BYOM-LoRA), dropping backward computation (DropBP), or sharing
frozen random bases and training only small vectors (VeRA, VB-LoRA, FourierFT).
"""
