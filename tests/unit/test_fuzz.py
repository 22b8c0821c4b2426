"""Hostile input never escapes as a traceback (pure Python, no kernel).

Mutation fuzzing over the three formats (the example documents, the seed
template and hand-written hostile ones, mutated as parsed objects and as
text) and over every API action: the only exceptions allowed out are the
project's own (ValidationError from the formats, ApiError from the actions),
and a failed action leaves the state it was given unchanged.

``SGCTL_FUZZ_EXAMPLES`` sets the examples per test (default 600; 20000 for a
long run: ``SGCTL_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py``).
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.policy import actions
from controller.policy.errors import ApiError, ValidationError
from controller.policy.formats import load_document, load_text
from controller.policy.formats.native import dump
from controller.policy.model import validate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("SGCTL_FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

SEED_TEMPLATE = (ROOT / "tests" / "data" / "seed-template.yaml").read_text()


def _docs() -> List[Any]:
    docs = [json.loads((ROOT / "examples" / "aws.json").read_text()),
            yaml.safe_load((ROOT / "examples" / "native.yaml").read_text())]
    from controller.policy.formats.cfn import parse_text

    docs.append(parse_text((ROOT / "examples" / "web-stack.yaml").read_text()))
    docs.append(parse_text(SEED_TEMPLATE))
    return docs


DOCS = _docs()
TEXTS = [(ROOT / "examples" / n).read_text() for n in ("aws.json", "native.yaml", "web-stack.yaml")]
TEXTS.append(SEED_TEMPLATE)

# values that broke loaders before, or that a careless or hostile writer sends
HOSTILE = [None, "", " ", "x", "-1", "false", "true", "0", "65536", -1, 0, 1, 65536, 2 ** 70,
           -(2 ** 70), 1.5, float("nan"), True, False, [], {}, [None], [[]], [{}], {"": None},
           "0.0.0.0/0", "::/0", "fe80::1%eth0/64", "198.18.0.1", "sg-default", "default",
           "eni-x\n", "veth0\n", "sg-", "pl-a", "sgr-1", "tcp", "icmp", "9" * 5000,
           {"Ref": "x"}, {"Ref": []}, {"Fn::GetAtt": "x"}, {"Fn::GetAtt": ["a"]},
           {"Fn::Join": [","]}, {"Fn::Join": "x"}, {"Fn::Select": [5, []]},
           {"Fn::Select": ["x", [1]]}, {"Fn::Sub": []}, {"Fn::Sub": ["${x}", []]},
           {"Fn::Split": [",", "a"]}, {"Key": 1}, [{"Key": []}], {"Value": {}},
           "\u0000", "\u2028", "a" * 300]

hostile = st.sampled_from(HOSTILE).map(copy.deepcopy) | st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                   max_size=3),
    max_leaves=6)


def _paths(doc: Any, prefix: tuple = ()) -> List[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: Any, path: tuple, op: str, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "wrap":
        parent[last] = [parent[last]]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    elif op == "rekey" and isinstance(parent, dict) and isinstance(value, str):
        parent[value] = parent.pop(last)
    else:
        parent[last] = value
    return doc


TALLY: Counter = Counter()  # what the run tried; SGCTL_FUZZ_TALLY=FILE writes it out


@pytest.fixture(scope="module", autouse=True)
def _tally() -> Iterator[None]:
    yield
    if os.environ.get("SGCTL_FUZZ_TALLY"):
        Path(os.environ["SGCTL_FUZZ_TALLY"]).write_text(json.dumps(TALLY, indent=1) + "\n")


def _load_quietly(kind: str, call: Any) -> None:
    TALLY[f"{kind} tried"] += 1
    try:
        call()
        TALLY[f"{kind} loaded"] += 1
    except ValidationError as exc:
        assert exc.message and exc.obj, "an error names the object and what is wrong"
        TALLY[f"{kind} clean errors"] += 1


@FUZZ
@given(st.data())
def test_mutated_documents_give_clean_errors(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(DOCS)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        op = data.draw(st.sampled_from(["set", "set", "delete", "wrap", "duplicate", "rekey"]))
        if op == "delete" and not path:
            continue
        doc = _mutate(doc, path, op, data.draw(hostile))
    _load_quietly("documents", lambda: load_document(doc))


@FUZZ
@given(st.data())
def test_mutated_text_gives_clean_errors(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(TEXTS))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.sampled_from(
            ["&a ", "*a", "!Ref ", "!GetAtt ", "!Join ", "!Select ", "!Sub ", "[", "{", "]",
             "}", ":", "- ", "\n", "  ", "'", '"', "<<: *a", "!!python/object:os.system ",
             "!!binary ", "? ", "---\n", "~", ",", "0x", "1e999"]) | st.text(max_size=4))
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + len(piece):]
        else:
            text = text[:pos] + piece + text[pos + len(piece):]
    _load_quietly("texts", lambda: load_text(text))


# --------------------------------------------------------------------------- API actions

PARAM_NAMES = sorted({
    "GroupId", "GroupName", "Description", "IpPermissions", "SecurityGroupRuleIds",
    "GroupIds", "GroupNames", "Filters", "SecurityGroupRules", "PrefixListId",
    "PrefixListName", "AddressFamily", "MaxEntries", "Entries", "AddEntries", "RemoveEntries",
    "CurrentVersion", "PrefixListIds", "NetworkInterfaceId", "NetworkInterfaceIds", "Groups",
    "PrivateIpAddress", "PrivateIpAddresses", "Ipv6Addresses", "SourceDestCheck", "MacAddress",
    "ConnectionTrackingSpecification", "TagSpecifications", "Tags"})

BASE = load_text((ROOT / "examples" / "native.yaml").read_text())
GROUP = next(iter(BASE.groups))
ENI = next(iter(BASE.interfaces))
PL = next(iter(BASE.prefix_lists))
GOOD = {"GroupId": GROUP, "NetworkInterfaceId": ENI, "PrefixListId": PL,
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 2,
                           "IpRanges": [{"CidrIp": "198.18.9.0/24"}]}],
        "AddressFamily": "IPv4", "MaxEntries": 4, "GroupName": "fuzz", "Description": "d",
        "PrefixListName": "p", "Groups": [GROUP]}


@FUZZ
@given(st.data())
def test_api_actions_give_clean_errors(data: st.DataObject) -> None:
    action = data.draw(st.sampled_from(sorted(actions.ACTIONS)))
    params = {}
    for key in data.draw(st.lists(st.sampled_from(PARAM_NAMES), max_size=5, unique=True)):
        params[key] = copy.deepcopy(GOOD[key]) if key in GOOD and data.draw(st.booleans()) \
            else data.draw(hostile)
    if data.draw(st.booleans()):  # mutate inside a good value
        key = data.draw(st.sampled_from(sorted(GOOD)))
        value = copy.deepcopy(GOOD[key])
        path = data.draw(st.sampled_from(_paths(value)))
        params[key] = _mutate(value, path, "set", data.draw(hostile))
    before = dump(BASE)
    work = BASE.copy()
    TALLY["api requests tried"] += 1
    try:
        actions.run(work, action, params)
        validate(work)
        TALLY["api requests accepted"] += 1
    except (ApiError, ValidationError) as exc:
        assert str(exc)
        TALLY["api requests clean errors"] += 1
    assert dump(BASE) == before, "an action changed the state it was not given"


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"'])
def test_action_params_must_be_an_object(body: bytes) -> None:
    with pytest.raises(ApiError):
        actions.run(BASE.copy(), "DescribeSecurityGroups", json.loads(body))
