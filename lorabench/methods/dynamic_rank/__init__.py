"""Dynamic rank allocation (survey arXiv 2407.11046, section 4.2): methods that learn how much
rank each adapted layer gets: SVD-based (AdaLoRA, SaLoRA, IncreLoRA), SRD-based (DoRA's dynamic
rank distribution, AutoLoRA, SoRA, ALoRA) and rank sampling (DyLoRA). AutoLoRA's bi-level steps
come from `learning_procedure/bilevel.py`.
"""
