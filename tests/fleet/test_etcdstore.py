"""The desired state in a real etcd: one key per object, compare-and-swap
writes (no lost update), watches from a revision, compaction and an etcd
that goes away."""

from __future__ import annotations

import threading
from typing import Iterator, List

import pytest

from controller.policy.formats import load_document
from controller.policy.formats.keyspace import encode
from controller.service.etcdstore import Compacted, Conflict, EtcdStore, Event, Unavailable
from controller.tools.etcd import EtcdProc

P = "/sgt/"


def state(port: int = 22):
    return load_document({"sgctl": 1, "groups": {"sg-a": {"name": "a", "ingress": [
        {"proto": "tcp", "ports": port, "from": "198.18.0.0/24"}]}},
        "interfaces": {"eni-a": {"groups": ["sg-a"], "node": "h1", "device": "veth0"}}})


@pytest.fixture
def etcd() -> Iterator[EtcdProc]:
    e = EtcdProc()
    try:
        yield e
    finally:
        e.close()


def store(etcd: EtcdProc) -> EtcdStore:
    host, port = etcd.endpoint.split(":")
    return EtcdStore([(host, int(port))], prefix=P, timeout=2.0)


def test_a_commit_writes_one_key_per_object(etcd: EtcdProc) -> None:
    s = store(etcd)
    empty = s.read()
    assert empty.generation_rev == 0 and not empty.kvs
    rev = s.commit(empty, state())
    got = s.read()
    assert got.revision == rev and got.kvs == encode(state(), P)
    assert got.state.groups["sg-a"].rules[0].from_port == 22


def test_two_writers_on_one_base_cannot_both_win(etcd: EtcdProc) -> None:
    a, b = store(etcd), store(etcd)
    base = a.read()
    a.commit(base, state(80))
    with pytest.raises(Conflict):
        b.commit(base, state(443))
    fresh = b.read()  # the loser retries on fresh state
    b.commit(fresh, state(443))
    assert a.read().state.groups["sg-a"].rules[0].from_port == 443


def test_a_change_rewrites_only_its_keys(etcd: EtcdProc) -> None:
    s = store(etcd)
    s.commit(s.read(), state())
    before = s.read()
    events: List[Event] = []
    stop = threading.Event()

    def collect(evs: List[Event]) -> None:
        events.extend(evs)
        stop.set()

    t = threading.Thread(target=lambda: _watch(s, before.revision + 1, collect, stop))
    t.start()
    s.commit(before, state(80))
    t.join(10)
    keys = sorted(e.key[len(P):].split("/")[0] for e in events)
    assert keys == ["meta", "rules", "rules"], "the old rule goes, the new comes, the generation"
    assert any(e.value is None for e in events), "the old rule's key is deleted"


def _watch(s: EtcdStore, rev: int, cb, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    try:
        s.watch(rev, cb, stop)
    except Unavailable:
        pass


def test_a_compacted_revision_says_so(etcd: EtcdProc) -> None:
    s = store(etcd)
    first = s.commit(s.read(), state())
    last = s.commit(s.read(), state(80))
    s.compact(last)
    with pytest.raises(Compacted):
        s.watch(first, lambda evs: None, threading.Event())


def test_no_etcd_is_unavailable_and_a_restart_is_seen(etcd: EtcdProc) -> None:
    s = store(etcd)
    s.commit(s.read(), state())
    etcd.kill()
    with pytest.raises(Unavailable, match="no etcd endpoint answers"):
        s.read()
    etcd.start()
    assert s.read().state.groups["sg-a"].rules[0].from_port == 22, "the data survived"
