"""The desired state as a key space (the fleet's etcd): one key per object
under a prefix, never one blob, so a change is a small write and a small
watch event.

    {prefix}settings                  the settings
    {prefix}groups/{sg-id}            a group: name, description, tags
    {prefix}rules/{sg-id}/{sgr-id}    one rule: the native rule and its direction
    {prefix}prefix-lists/{pl-id}      a prefix list with its entries
    {prefix}interfaces/{eni-id}       an interface: node, device, addresses, ...

Values are JSON in the native format's words (formats/native.py), keys
sorted, so that equal objects have equal bytes and a change rewrites only
the objects it touched. Keys outside these kinds (``nodes/``, ``meta/``)
are the datastore's own and not part of the desired state.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import orjson

from controller.policy.errors import ValidationError
from controller.policy.formats import native
from controller.policy.model import DIRECTIONS, State, validate

DEFAULT_PREFIX = "/sgctl/v1/"
SETTINGS, GROUPS, RULES, PREFIX_LISTS, INTERFACES = (
    "settings", "groups/", "rules/", "prefix-lists/", "interfaces/")
STATE_KINDS = (SETTINGS, GROUPS, RULES, PREFIX_LISTS, INTERFACES)

KeyValues = Dict[str, bytes]


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def is_state_key(key: str, prefix: str) -> bool:
    """Whether ``key`` holds part of the desired state."""
    rest = key[len(prefix):] if key.startswith(prefix) else None
    return rest is not None and (rest == SETTINGS or
                                 any(rest.startswith(k) for k in STATE_KINDS[1:]))


def encode(state: State, prefix: str = DEFAULT_PREFIX) -> KeyValues:
    """State -> {key: value}."""
    doc = native.dump(state)
    out: KeyValues = {prefix + SETTINGS: _json(doc["settings"])}
    for gid, g in doc["groups"].items():
        out[f"{prefix}{GROUPS}{gid}"] = _json({k: g[k] for k in ("name", "description", "tags")
                                                if k in g})
        for direction in DIRECTIONS:
            for spec in g[direction]:
                out[f"{prefix}{RULES}{gid}/{spec['id']}"] = _json({**spec, "direction": direction})
    for plid, p in doc["prefix_lists"].items():
        out[f"{prefix}{PREFIX_LISTS}{plid}"] = _json(p)
    for eid, e in doc["interfaces"].items():
        out[f"{prefix}{INTERFACES}{eid}"] = _json(e)
    return out


def _value(raw: bytes, key: str) -> Dict[str, Any]:
    try:
        val = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(key, "value", f"not JSON: {exc}") from None
    if not isinstance(val, dict):
        raise ValidationError(key, "value", "must be an object")
    return val


def decode(kvs: Mapping[str, bytes], prefix: str = DEFAULT_PREFIX) -> State:
    """{key: value} -> a validated State; keys that are not desired state are
    ignored, a malformed one is an error naming its key."""
    doc: Dict[str, Any] = {"sgctl": 1, "groups": {}, "prefix_lists": {}, "interfaces": {}}
    rules: List[Tuple[str, str, Dict[str, Any]]] = []
    for key in sorted(kvs):
        if not is_state_key(key, prefix):
            continue
        rest, val = key[len(prefix):], _value(kvs[key], key)
        if rest == SETTINGS:
            doc["settings"] = val
        elif rest.startswith(GROUPS):
            doc["groups"][rest[len(GROUPS):]] = {**val, "ingress": [], "egress": []}
        elif rest.startswith(RULES):
            gid, sep, rid = rest[len(RULES):].partition("/")
            if not sep or val.get("id") != rid:
                raise ValidationError(key, "id", "a rule's key is rules/<group>/<its id>")
            rules.append((gid, key, val))
        elif rest.startswith(PREFIX_LISTS):
            doc["prefix_lists"][rest[len(PREFIX_LISTS):]] = val
        else:
            doc["interfaces"][rest[len(INTERFACES):]] = val
    for gid, key, val in rules:
        group = doc["groups"].get(gid)
        direction = val.pop("direction", None)
        if group is None:
            raise ValidationError(key, "group", f"rule of {gid}, which has no key")
        if direction not in DIRECTIONS:
            raise ValidationError(key, "direction", f"{direction!r} is not ingress or egress")
        group[direction].append(val)
    return validate(native.load(doc))


def diff(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> Tuple[KeyValues, List[str]]:
    """(keys to put with their values, keys to delete) that turn ``old`` into ``new``."""
    puts = {k: v for k, v in new.items() if old.get(k) != v}
    return puts, sorted(k for k in old if k not in new)
