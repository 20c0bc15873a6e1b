"""The method registry: lazy entries "module:Class", looked up by lower-case name.

Adding a method: write `lorabench/methods/<name or family>/` with a config dataclass and a
`Method` subclass, then add one `register_lazy` line below (docs/adding-a-method.md).
"""
from lorabench.registry import Registry

METHODS: Registry = Registry("method")

# Baselines
METHODS.register_lazy("full", "lorabench.methods.baselines:FullFineTuning")
METHODS.register_lazy("head", "lorabench.methods.baselines:HeadOnly")
# LoRA (arXiv 2106.09685)
METHODS.register_lazy("lora", "lorabench.methods.lora:LoRA")


def get_method(name: str):
    """The Method class registered as `name` (UserError with did-you-mean otherwise)."""
    return METHODS.get(name)
