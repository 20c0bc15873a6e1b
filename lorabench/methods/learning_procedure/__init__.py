"""Optimizing the learning procedure (survey arXiv 2407.11046, section 4.3): initialisation (PiSSA,
MiLoRA, LoRA's Init[B]), gradient updates (rsLoRA's scaling, LoRA+, Riemannian preconditioning)
and overfitting mitigation (LoRA Dropout, SIBO, ResLoRA, HiddenKey, BiLoRA): they change how LoRA
learns, not what it can represent. `bilevel.py` holds the bi-level step schedule BiLoRA shares with
AutoLoRA (dynamic_rank/).
"""
