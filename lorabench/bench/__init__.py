"""Benchmarks behind `python -m lorabench bench ...`: each module exposes `main(argv) -> int`."""
