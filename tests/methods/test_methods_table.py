"""Every case of every `cases_*.py` table crossed with the shared checks of tester.py."""
import importlib
import pkgutil
from pathlib import Path

import pytest

from lorabench.methods import METHODS
from tests.methods import tester

CASES = []
for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if mod.name.startswith("cases_"):
        CASES.extend(importlib.import_module(f"tests.methods.{mod.name}").CASES)

PARAMS = [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in c.models]


def test_every_registered_method_has_a_case():
    missing = set(METHODS.names()) - {c.method for c in CASES}
    assert not missing, f"methods without a row in the methods table: {sorted(missing)}"


@pytest.mark.parametrize("case,kind", PARAMS)
def test_forward(case, kind):
    tester.check_forward(case, kind)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_training_step_changes_only_trainable_parameters(case, kind):
    tester.check_training_changes_only_trainable(case, kind)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_merge_unmerge(case, kind):
    tester.check_merge(case, kind)


@pytest.mark.parametrize("case,kind", PARAMS)
def test_save_load_round_trip(case, kind, tmp_path):
    tester.check_save_load(case, kind, tmp_path)


@pytest.mark.parametrize("case", [c for c in CASES if c.equations], ids=lambda c: c.name)
def test_paper_equations(case):
    _, model, method, _ = tester.applied(case, case.models[0])
    case.equations(model, method)
