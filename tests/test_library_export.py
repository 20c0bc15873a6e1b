"""A library trained on one machine is reused on another (lorabench/harness/multitask.py: export_library,
library_search_path, locate_adapter; docs/cross-task.md): exported with a sha256 manifest, found on
$LORABENCH_LIBRARY_PATH instead of being trained, and refused, by name, when its bytes are not what was exported."""
import json

import pytest
import torch

from lorabench.assets.download import sha256_file
from lorabench.cli import main
from lorabench.errors import UserError
from lorabench.harness import multitask
from lorabench.harness.multitask import (LibraryConfig, build_library, build_linearized_library,
                                         build_multitask_adapter, export_library, load_library_adapter)
from lorabench.harness.train import TrainConfig

TASKS = ["quartz", "sarcasm-mc"]
LIB, CFG = LibraryConfig(rank=2, alpha=4.0), TrainConfig(steps=2, batch_size=2, lr=1e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny library (2 adapters), its multi-task reference and L-LoRA's linearised library, trained once."""
    root = tmp_path_factory.mktemp("cache")
    paths = build_library(TASKS, "tiny-llama", LIB, CFG, root=root, progress=False)
    multi = build_multitask_adapter(TASKS, "tiny-llama", LIB, CFG, root=root, progress=False)
    linear = build_linearized_library(TASKS, "tiny-llama", LIB, CFG, root=root, progress=False)
    return root, paths, multi, linear


def no_training(*args, **kwargs):
    raise AssertionError("trained an adapter the search path holds")


def test_an_exported_library_is_found_instead_of_trained(trained, tmp_path, monkeypatch):
    root, paths, multi, linear = trained
    names = export_library(tmp_path / "export", source=root)
    assert sorted(names) == sorted(p.name for p in [*paths.values(), multi, *linear.values()])
    manifest = json.loads((tmp_path / "export" / multitask.MANIFEST).read_text())
    entry = manifest["adapters"][paths["quartz"].name]
    assert entry["sha256"] == sha256_file(paths["quartz"]) and entry["library"]["task"] == "quartz"
    monkeypatch.setenv(multitask.LIBRARY_PATH_ENV, str(tmp_path / "nowhere") + ":" + str(tmp_path / "export"))
    monkeypatch.setattr(multitask, "train_fused", no_training)
    monkeypatch.setattr("lorabench.harness.train.train", no_training)
    empty = tmp_path / "fresh-cache"   # another machine: nothing cached
    found = build_library(TASKS, "tiny-llama", LIB, CFG, root=empty, progress=False)
    assert found == {t: tmp_path / "export" / p.name for t, p in paths.items()}
    for t in TASKS:
        a, b = load_library_adapter(found[t]), load_library_adapter(paths[t])
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert build_multitask_adapter(TASKS, "tiny-llama", LIB, CFG, root=empty, progress=False).parent == tmp_path / "export"
    assert {p.parent for p in build_linearized_library(TASKS, "tiny-llama", LIB, CFG, root=empty,
                                                       progress=False).values()} == {tmp_path / "export"}
    assert not empty.exists()   # the search path is read, never written


def test_another_recipe_is_not_taken_from_the_export(trained, tmp_path, monkeypatch):
    """Files are found by adapter id: a library of another recipe (here another rank) is trained, not reused."""
    root, paths, _, _ = trained
    export_library(tmp_path / "export", source=root)
    monkeypatch.setenv(multitask.LIBRARY_PATH_ENV, str(tmp_path / "export"))
    other = build_library(["quartz"], "tiny-llama", LibraryConfig(rank=3, alpha=4.0), CFG, root=tmp_path / "c",
                          progress=False)
    assert other["quartz"].parent == tmp_path / "c" and other["quartz"].exists()


@pytest.mark.parametrize("damage, pattern", [
    (lambda p, m: p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),
     "does not match .*Git LFS pointer"),
    (lambda p, m: m.unlink(), "no readable MANIFEST.json"),
    (lambda p, m: m.write_text(json.dumps({"adapters": {}})), "is not listed in"),
])
def test_a_damaged_export_is_refused_by_name(trained, tmp_path, monkeypatch, damage, pattern):
    root, paths, _, _ = trained
    export_library(tmp_path / "export", source=root, ids=[paths["quartz"].stem])
    damage(tmp_path / "export" / paths["quartz"].name, tmp_path / "export" / multitask.MANIFEST)
    monkeypatch.setenv(multitask.LIBRARY_PATH_ENV, str(tmp_path / "export"))
    with pytest.raises(UserError, match=pattern):
        build_library(["quartz"], "tiny-llama", LIB, CFG, root=tmp_path / "c", progress=False)


def test_search_path_defaults_and_export_errors(trained, tmp_path, monkeypatch):
    root, paths, _, _ = trained
    monkeypatch.setenv(multitask.LIBRARY_PATH_ENV, "")
    assert multitask.library_search_path() == []
    monkeypatch.delenv(multitask.LIBRARY_PATH_ENV)
    assert multitask.library_search_path() == ([multitask.COMMITTED_LIBRARY] if multitask.COMMITTED_LIBRARY.is_dir()
                                               else [])
    with pytest.raises(UserError, match="not in .*nothing was copied"):
        export_library(tmp_path / "x", source=root, ids=["0123456789abcdef"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="holds no library adapter"):
        export_library(tmp_path / "x", source=tmp_path / "empty")


def test_the_cli_lists_and_exports(trained, tmp_path, monkeypatch, capsys):
    root, paths, _, _ = trained
    monkeypatch.setenv("LORABENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(multitask.LIBRARY_PATH_ENV, str(tmp_path / "export"))
    assert main(["library", "export", "--source", str(root), "--out", str(tmp_path / "export"),
                 paths["sarcasm-mc"].stem]) == 0
    assert "exported 1 adapter(s)" in capsys.readouterr().out
    assert main(["library", "list"]) == 0
    out = capsys.readouterr().out
    assert "cache: " in out and f"search path: {tmp_path / 'export'} (1 adapter(s))" in out
    assert paths["sarcasm-mc"].stem in out and "sarcasm-mc" in out
    assert main(["library", "export"]) == 2
    assert "needs --out" in capsys.readouterr().err
