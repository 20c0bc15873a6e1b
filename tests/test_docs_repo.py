"""The repository explains itself (issue 22): its documents exist, its references stay inside it,
and the README's commands work after the Quickstart as written and match CI's."""
import re
from pathlib import Path

from tests.conftest import REPO

SOURCES = [p for d in ("lorabench", "tests", "docs", "csrc", "suites", ".ci") for p in (REPO / d).rglob("*")
           if p.is_file() and p.suffix in (".py", ".md", ".cpp", ".h", ".cu", ".yaml", "") and "__pycache__" not in p.parts]
SOURCES += [REPO / "README.md", REPO / "setup.py", REPO / "pytest.ini"]


def bash_blocks(markdown: str) -> list[str]:
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", markdown, re.S) for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_no_reference_to_a_document_outside_the_repository():
    outside = "DES" + "IGN"  # the design notes that lived outside the repository, by name
    hits = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in
            enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if re.search(rf"\b{outside}\b", line)]
    assert not hits, hits


def test_every_docs_reference_exists():
    # documents under docs named in code and comments, and relative links in the Markdown files
    missing = []
    for p in SOURCES:
        text = p.read_text(encoding="utf-8", errors="replace")
        for ref in re.findall(r"\bdocs/[\w./-]+\.(?:md|tsv)", text):
            if not (REPO / ref).exists():
                missing.append(f"{p.relative_to(REPO)}: {ref}")
        if p.suffix == ".md":
            for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if not link.startswith(("http://", "https://")) and not (p.parent / link).exists():
                    missing.append(f"{p.relative_to(REPO)}: {link}")
    assert not missing, missing
    assert (REPO / "docs" / "architecture.md").exists()


def test_readme_commands_run_from_the_quickstarts_venv():
    # the Quickstart makes .venv and never activates it: a bare `python` there is another Python
    commands = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert commands[0].startswith("python3 -m venv .venv")
    bare = [c for c in commands[1:] if not c.startswith(".venv/bin/python ")]
    assert not bare, bare


def test_readme_test_commands_are_cis_verbatim():
    readme = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in (".venv/bin/python -m pytest -q", ".venv/bin/python -m pytest -q -m slow"):
        assert command in readme and command in ci, command


def test_slow_tests_are_out_of_the_default_run():
    import subprocess
    import sys
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_runner.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    assert "test_failed_trial_is_recorded_and_the_suite_goes_on" in listed
    assert "test_smoke_suite_runs_every_method_end_to_end" not in listed


def _module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for cand in (path.with_suffix(".py"), path / "__init__.py"):
        if cand.exists():
            return cand
    return None


def test_every_named_module_path_exists():
    # modules named in code, tests and docs (dotted, as in imports and registry entries, or as files
    # under lorabench/) exist, and a name after the module is in it: a moved module leaves none stale
    stale = []
    for p in SOURCES:
        text = p.read_text(encoding="utf-8", errors="replace")
        for ref in set(re.findall(r"(?<![\w/])(?:lorabench/)?methods/[\w/]+\.py\b|\blorabench/[\w/]+\.py\b", text)):
            if not (REPO / (ref if ref.startswith("lorabench/") else f"lorabench/{ref}")).exists():
                stale.append(f"{p.relative_to(REPO)}: {ref}")
        for ref in set(re.findall(r"\blorabench(?:\.\w+)+(?::\w+)?", text)):
            parts = ref.replace(":", ".").split(".")
            if not _module_file(".".join(parts[:2])):
                continue  # not a module path: an op of the lorabench namespace (torch.ops.lorabench.X), _C
            n = max((k for k in range(1, len(parts) + 1) if _module_file(".".join(parts[:k]))), default=0)
            rest = parts[n:]
            if n == 0 or (rest and not re.search(rf"\b{rest[0]}\b", _module_file(".".join(parts[:n])).read_text(
                    encoding="utf-8", errors="replace"))):
                stale.append(f"{p.relative_to(REPO)}: {ref}")
    assert not stale, stale
