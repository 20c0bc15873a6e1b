"""Efficiency: parameter pruning (survey arXiv 2407.11046, "Efficiency Improving / Parameter
Reduction / Parameter Pruning"): removing adapter or backbone parameters by importance (LoRA-drop,
LoRAPrune, LoRAShear, layer pruning).
"""
