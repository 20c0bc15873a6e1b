"""The registry and the strict config layer: errors name what is wrong and what is valid."""
from dataclasses import dataclass
from typing import Literal

import pytest

from lorabench.config import from_dict, option
from lorabench.errors import UserError
from lorabench.methods import METHODS, get_method
from lorabench.registry import Registry
from lorabench.tasks import TASKS


def test_unknown_method_suggests_the_close_name():
    with pytest.raises(UserError, match=r"Unknown method 'lorra'\. Did you mean: lora\b"):
        get_method("lorra")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as e:
        TASKS.get("no-such-task")
    assert "rt-sentiment" in str(e.value) and "Did you mean" not in str(e.value)


def test_registry_rejects_bad_and_duplicate_names():
    r = Registry("thing")
    r.register_lazy("a", "os:path")
    with pytest.raises(ValueError):
        r.register_lazy("a", "os:sep")
    with pytest.raises(ValueError):
        r.register_lazy("Upper", "os:sep")
    import os
    assert r.get("a") is os.path


@dataclass
class Demo:
    rank: int = option(8, "rank", low=1)
    alpha: float = option(16.0, "alpha")
    mode: Literal["a", "b"] = option("a", "mode")
    names: list[str] | None = option(None, "names")
    flag: bool = option(False, "flag")


def test_from_dict_coerces_cli_strings():
    d = from_dict(Demo, {"rank": "4", "alpha": "1e-3", "names": "q,v", "flag": "true"}, "x")
    assert (d.rank, d.alpha, d.names, d.flag) == (4, 1e-3, ["q", "v"], True)


@pytest.mark.parametrize("data,pattern", [
    ({"rnak": 4}, r"unknown key 'rnak'\. Did you mean: rank\? Valid keys: alpha, flag, mode, names, rank"),
    ({"rank": "four"}, r"x\.rank: expected an integer, got 'four'"),
    ({"rank": 0}, r"x\.rank: 0 is below the minimum 1"),
    ({"mode": "c"}, r"x\.mode: expected one of 'a', 'b', got 'c'"),
    ({"rank": True}, r"expected an integer"),
])
def test_from_dict_errors(data, pattern):
    with pytest.raises(UserError, match=pattern):
        from_dict(Demo, data, "x")


def test_every_method_config_has_help_and_every_method_names_its_paper_and_family():
    import dataclasses

    from lorabench.methods.base import FAMILIES
    for name, cls in METHODS.items():
        assert cls.family in FAMILIES, name
        assert cls.paper or cls.family == "baseline", name
        for f in dataclasses.fields(cls.config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_every_method_lives_in_its_family_folder_under_its_own_name():
    # one home per method by the survey's taxonomy (lorabench/methods/__init__.py, docs/architecture.md):
    # lorabench/methods/<family>/<name>.py with "-" as "_", and the registry entry names that module
    import re

    from lorabench.methods.base import FAMILIES
    from tests.conftest import REPO
    methods_dir = REPO / "lorabench" / "methods"
    text = (methods_dir / "__init__.py").read_text(encoding="utf-8")
    targets = dict(re.findall(r'register_lazy\(\s*"([^"]+)",\s*"([^"]+)"', text))
    assert set(targets) == set(METHODS.names())
    wrong = []
    for name in METHODS.names():
        cls = get_method(name)
        home = f"lorabench.methods.{cls.family.replace('-', '_')}.{name.replace('-', '_')}"
        if cls.__module__ != home or targets[name] != f"{home}:{cls.__name__}":
            wrong.append(f"{name}: registered as {targets[name]}, defined in {cls.__module__}; its home is {home}")
    assert not wrong, wrong
    folders = {d.name for d in methods_dir.iterdir() if d.is_dir() and d.name != "__pycache__"}
    assert folders <= {f.replace("-", "_") for f in FAMILIES}, folders
