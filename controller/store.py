"""The embedded store: the desired state the daemon last accepted.

One JSON file, ``<state-dir>/desired.json`` = ``{"generation": N, "state":
<native document>}``, replaced by write-to-temp, fsync, rename, fsync of the
directory. A crash at any point leaves either the previous file or the new
one, never a torn one; a leftover temp file is ignored and removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import orjson

from .model import State, ValidationError

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


class StoreError(RuntimeError):
    pass


@dataclass
class Stored:
    generation: int
    state: State


class Store:
    def __init__(self, state_dir: str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "desired.json"

    def load(self) -> Optional[Stored]:
        """The last saved state, or None when nothing was ever saved."""
        from .formats import native
        from .model import validate

        for leftover in self.dir.glob(f".{self.path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            return Stored(int(doc["generation"]), validate(native.load(doc["state"])))
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise StoreError(f"{self.path}: stored state is unreadable: {exc}") from exc

    def save(self, generation: int, state: State) -> None:
        from .formats import native

        doc = {"generation": generation, "state": native.dump(state)}
        write_atomic(self.path, orjson.dumps(doc))  # JSON; orjson: ~5x faster on big states
