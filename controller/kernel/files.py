"""Crash-safe file writes (the store and the reconciler's applied record)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

CHUNK = 1 << 16  # bytes per write(2), so a crash can land between writes


def write_atomic(path: Path, text: Union[str, bytes]) -> None:
    """Write-then-rename, fsynced: a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, len(data), CHUNK):
            os.write(fd, data[off:off + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
