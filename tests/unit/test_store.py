"""Crash-safety of the store: a write interrupted at any system call leaves
the previous or the new state, never a broken file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from controller.kernel import files as files_mod
from controller.policy.formats import native
from controller.policy.model import State
from controller.service.store import Store, StoreError
from tests.states import one_interface


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def _state(n_rules: int) -> State:
    return one_interface([{"proto": "tcp", "ports": p, "from": f"198.18.{p % 250}.0/24"}
                          for p in range(1, n_rules + 1)])


def _crash_after(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the n-th file-system call of the store raise Crash."""
    calls = {"n": 0}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == n:
                if fn is os.write:  # die half-way through the write
                    fn(a[0], a[1][: len(a[1]) // 2])
                raise Crash()
            return fn(*a, **kw)
        return inner

    for name in ("open", "write", "fsync", "close", "replace"):
        monkeypatch.setattr(files_mod.os, name, wrap(getattr(os, name)))


def test_store_round_trip(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    assert s.load() is None
    state = _state(5)
    s.save(7, state)
    got = s.load()
    assert got is not None and got.generation == 7
    assert native.dump(got.state) == native.dump(state)


def test_interrupted_write_leaves_old_or_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _state(3), _state(3000)  # the new one spans several write(2) calls
    Store(str(tmp_path)).save(1, old)
    outcomes = set()
    n = 1
    while True:
        with monkeypatch.context() as m:
            _crash_after(n, m)
            try:
                Store(str(tmp_path)).save(2, new)
                finished = True
            except Crash:
                finished = False
        got = Store(str(tmp_path)).load()  # also removes the temp file a crash left
        assert got is not None
        assert got.generation in (1, 2)
        want = new if got.generation == 2 else old
        assert native.dump(got.state) == native.dump(want)
        outcomes.add(got.generation)
        assert not list(tmp_path.glob(".desired.json.*"))
        if finished:
            break
        Store(str(tmp_path)).save(1, old)
        n += 1
    assert n > 5, "the write should have had several crash points"
    assert outcomes == {1, 2}


def test_unreadable_store_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "desired.json").write_text('{"generation": 1, "state": {"groups": 5}}')
    with pytest.raises(StoreError, match="desired.json"):
        Store(str(tmp_path)).load()


def test_tags_and_nodes_survive_the_store(tmp_path: Path) -> None:
    """Group and interface tags and an interface's node are part of the
    desired state: a daemon restart must not drop them."""
    from controller.policy.formats import load_document

    state = load_document({"sgctl": 1, "groups": {"sg-a": {"name": "a", "tags": {"team": "web"}}},
                           "interfaces": {"eni-a": {"groups": ["sg-a"], "device": "veth0",
                                                    "node": "host-2", "tags": {"env": "prod"}}}})
    Store(str(tmp_path)).save(1, state)
    got = Store(str(tmp_path)).load()
    assert got is not None
    assert got.state.groups["sg-a"].tags == {"team": "web"}
    assert got.state.interfaces["eni-a"].tags == {"env": "prod"}
    assert got.state.interfaces["eni-a"].node == "host-2"
