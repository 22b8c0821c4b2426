"""The embedded store: the desired state the daemon last accepted.

One JSON file, ``<state-dir>/desired.json`` = ``{"generation": N, "state":
<native document>}``, replaced by write-to-temp, fsync, rename, fsync of the
directory. A crash at any point leaves either the previous file or the new
one, never a torn one; a leftover temp file is ignored and removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import orjson

from controller.kernel.files import write_atomic
from controller.policy.errors import ValidationError
from controller.policy.formats import native
from controller.policy.model import State, validate


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
        self.specs = native.SpecCache()

    def load(self) -> Optional[Stored]:
        """The last saved state, or None when nothing was ever saved."""
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
        doc = {"generation": generation, "state": native.dump(state, self.specs)}
        self.specs.done()
        write_atomic(self.path, orjson.dumps(doc))  # JSON; orjson: ~5x faster on big states

    def remove(self) -> None:
        """Forget the desired state (``sgctl reset``)."""
        self.path.unlink(missing_ok=True)
