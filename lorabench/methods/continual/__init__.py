"""LoRA for continual learning (issue 18): methods driven by the sequence scenario (lorabench/harness/sequence.py)."""
