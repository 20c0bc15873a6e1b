"""Dynamic rank allocation (survey arXiv 2407.11046, section 4.2): methods that learn how much
rank each adapted layer gets (SaLoRA's gates, IncreLoRA's growth; AutoLoRA lives with the
bi-level procedures in methods/procedure).
"""
