"""Breaking the low-rank bottleneck (survey arXiv 2407.11046, section 4.1).

Methods whose total update is of higher rank than one LoRA: merge-and-restart (ReLoRA, CoLA),
low-rank gradient compression with resampled projections (FLoRA), co-updating the frozen weight
(Delta-LoRA), block-diagonal mini-ensembles (MELoRA), square high-rank updates (MoRA), parallel
heads merged periodically (LTE), and DoRA's magnitude and direction. `layer.py` is the shared
layer of the merge-and-restart methods.
"""
