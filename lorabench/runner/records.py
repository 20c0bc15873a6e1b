"""Result records: one JSON object per line, appended atomically, never rewritten in place.

A record is written with a single write() on an O_APPEND file under an exclusive lock and
fsync'd. A line left torn by a killed writer is skipped on reading (with a warning) and fenced
off with a newline before the next append, so it can never swallow a later record.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

RECORD_VERSION = 1


def append_record(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")  # fence off a torn line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_records(path: str | Path, warn: bool = True, skipped: list[str] | None = None) -> list[dict]:
    """The records of a JSONL file (none if it does not exist). A torn or malformed line is skipped,
    with a warning if `warn`, and its "path:line" appended to `skipped` if given (the report says so)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if warn:
                    print(f"warning: {path}:{n}: skipping a torn or malformed record line", file=sys.stderr)
                if skipped is not None:
                    skipped.append(f"{path}:{n}")
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
