"""The desired state as etcd keys: one key per object, round trips exactly,
a change touches only the keys of what changed, bad keys are clean errors."""

from __future__ import annotations

from typing import Any, Dict

import orjson
import pytest

from controller.policy.errors import ValidationError
from controller.policy.formats import load_document, native
from controller.policy.formats.keyspace import decode, diff, encode

P = "/t/"


def doc(port: int = 22, addr: str = "198.18.0.20") -> Dict[str, Any]:
    return {"sgctl": 1, "groups": {
        "sg-a": {"name": "a", "tags": {"team": "web"}, "vpc_id": "vpc-0abc",
                 "ingress": [{"proto": "tcp", "ports": port, "from": "sg-b", "id": "sgr-1",
                              "tags": {"why": "ssh"}}]},
        "sg-b": {"name": "b"}},
        "prefix_lists": {"pl-a": {"family": "ipv4", "max_entries": 2, "tags": {"site": "hq"},
                                  "entries": ["198.18.9.0/24"]}},
        "interfaces": {
            "eni-a": {"groups": ["sg-a"], "device": "veth0", "node": "h1", "ipv4": ["198.18.0.10"]},
            "eni-b": {"groups": ["sg-b"], "node": "h2", "ipv4": [addr]}}}


def test_one_key_per_object_and_a_round_trip() -> None:
    state = load_document(doc())
    kvs = encode(state, P)
    kinds = sorted(k[len(P):].split("/")[0] for k in kvs)
    assert kinds.count("rules") == sum(len(g.rules) for g in state.groups.values())
    assert kinds.count("groups") == len(state.groups) and kinds.count("interfaces") == 2
    assert kinds.count("prefix-lists") == 1 and kinds.count("settings") == 1
    assert native.dump(decode(kvs, P)) == native.dump(state)
    back = decode(kvs, P)
    assert back.groups["sg-a"].vpc_id == "vpc-0abc" and back.prefix_lists["pl-a"].tags
    assert back.groups["sg-a"].rules[0].tags == (("why", "ssh"),)
    assert encode(decode(kvs, P), P) == kvs, "equal objects, equal bytes"


CHANGES = [
    ("a member's address: one interface key", doc(addr="198.18.0.21"),
     {f"{P}interfaces/eni-b"}, set()),
    ("a rule's ports: its one key", doc(port=80), {f"{P}rules/sg-a/sgr-1"}, set()),
]


@pytest.mark.parametrize("desc,new,puts,deletes", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_change_touches_only_its_keys(desc: str, new: Dict[str, Any], puts: set,
                                        deletes: set) -> None:
    old_kvs = encode(load_document(doc()), P)
    new_kvs = encode(load_document(new), P)
    got_puts, got_deletes = diff(old_kvs, new_kvs)
    assert set(got_puts) == puts and set(got_deletes) == deletes, desc


BAD = [
    ("not JSON", {f"{P}groups/sg-a": b"{"}, "not JSON"),
    ("not an object", {f"{P}groups/sg-a": b"[1]"}, "must be an object"),
    ("a rule of no group", {f"{P}rules/sg-x/sgr-1": orjson.dumps(
        {"id": "sgr-1", "proto": "tcp", "ports": 22, "from": "0.0.0.0/0",
         "direction": "ingress"})}, "has no key"),
    ("a rule under another id", {f"{P}groups/sg-a": b"{}", f"{P}rules/sg-a/sgr-1": orjson.dumps(
        {"id": "sgr-2", "proto": "tcp", "ports": 22, "from": "0.0.0.0/0",
         "direction": "ingress"})}, "its id"),
    ("a bad interface", {f"{P}interfaces/eni-a": orjson.dumps({"groups": "sg-a"})}, "list"),
]


@pytest.mark.parametrize("desc,kvs,words", BAD, ids=[b[0] for b in BAD])
def test_bad_keys_are_clean_errors(desc: str, kvs: Dict[str, bytes], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        decode(kvs, P)


def test_keys_that_are_not_state_are_ignored() -> None:
    kvs = encode(load_document(doc()), P)
    kvs[f"{P}nodes/h1"] = b'{"seen": 1}'
    kvs["/other/groups/sg-z"] = b"junk"
    assert native.dump(decode(kvs, P)) == native.dump(load_document(doc()))
