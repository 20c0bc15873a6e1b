"""tools/gpu_check.sh (issue 20): the script parses, and refuses bad arguments with what is valid. Its
full dry run (every step but the CUDA build and the sanitizer) is a step of .ci/run."""
import subprocess

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_bad_argument_is_named():
    out = subprocess.run([str(SCRIPT), "--dryrun"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2
    assert "unknown argument '--dryrun'" in out.stderr and "--dry-run" in out.stderr


def test_ci_runs_the_dry_run():
    assert "tools/gpu_check.sh --dry-run" in (REPO / ".ci" / "run").read_text().splitlines()
