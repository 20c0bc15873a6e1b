"""Baselines (not LoRA): full fine-tuning (`full.py`) and a frozen backbone with a trained task head
(`head.py`), the references every adapter method is compared with.
"""
