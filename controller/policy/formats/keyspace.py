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

from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import orjson

from controller.policy.errors import ValidationError
from controller.policy.formats import native
from controller.policy.model import DIRECTIONS, Rule, State, validate

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
        out[f"{prefix}{GROUPS}{gid}"] = _json({k: g[k] for k in ("name", "description", "tags", "vpc_id")
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
    ignored, a malformed one is an error naming its key. (A patch of the
    empty state: one reader of the key space.)"""
    return patch(State(), kvs, prefix)


def _order(r: Rule) -> Tuple[int, str]:
    return (DIRECTIONS.index(r.direction), r.rule_id)


def patch(state: State, changes: Mapping[str, Optional[bytes]],
          prefix: str = DEFAULT_PREFIX) -> State:
    """The state after ``changes`` ({key: new value, None: deleted}) as a
    new validated State: only the changed keys are parsed, every other
    object is shared with ``state`` (which is left as it was). Equal to
    ``decode`` of the changed key space; a malformed value is an error
    naming its key."""
    doc: Dict[str, Any] = {"sgctl": 1, "groups": {}, "prefix_lists": {}, "interfaces": {}}
    gone: Dict[str, List[str]] = {"groups": [], "prefix_lists": [], "interfaces": []}
    rules_gone: Dict[str, set] = {}
    rules_new: List[Tuple[str, str, Dict[str, Any]]] = []
    settings = False
    for key in sorted(changes):
        if not is_state_key(key, prefix):
            continue
        rest, raw = key[len(prefix):], changes[key]
        val = None if raw is None else _value(raw, key)
        if rest == SETTINGS:
            settings = True
            if val is not None:
                doc["settings"] = val
        elif rest.startswith(RULES):
            gid, sep, rid = rest[len(RULES):].partition("/")
            rules_gone.setdefault(gid, set()).add(rid)
            if val is not None:
                if not sep or val.get("id") != rid:
                    raise ValidationError(key, "id", "a rule's key is rules/<group>/<its id>")
                rules_new.append((gid, key, val))
        else:
            kind, name = next((k, rest[len(pre):]) for k, pre in
                              (("groups", GROUPS), ("prefix_lists", PREFIX_LISTS),
                               ("interfaces", INTERFACES)) if rest.startswith(pre))
            if val is None:
                gone[kind].append(name)
            else:
                doc[kind][name] = {**val, "ingress": [], "egress": []} if kind == "groups" \
                    else val
    # the rules' groups, so that native.load parses the rules (and only them)
    for gid, key, val in rules_new:
        if gid not in doc["groups"]:
            if gid not in state.groups or gid in gone["groups"]:
                raise ValidationError(key, "group", f"rule of {gid}, which has no key")
            doc["groups"][gid] = {"name": gid, "ingress": [], "egress": [], "_rules_only": True}
        direction = val.pop("direction", None)
        if direction not in DIRECTIONS:
            raise ValidationError(key, "direction", f"{direction!r} is not ingress or egress")
        doc["groups"][gid][direction].append(val)
    only_rules = {gid for gid, g in doc["groups"].items() if g.pop("_rules_only", False)}
    parsed = native.load(doc)

    new = State(groups=dict(state.groups), prefix_lists=dict(state.prefix_lists),
                interfaces=dict(state.interfaces),
                settings=parsed.settings if settings else state.settings)
    for kind in ("prefix_lists", "interfaces"):
        objs = getattr(new, kind)
        for name in gone[kind]:
            objs.pop(name, None)
        objs.update(getattr(parsed, kind))
    for gid in set(parsed.groups) | set(rules_gone) | set(gone["groups"]):
        old = state.groups.get(gid)
        drop = rules_gone.get(gid, set())
        kept = [r for r in old.rules if r.rule_id not in drop] if old is not None else []
        got = parsed.groups.get(gid)
        if gid in gone["groups"] and got is None:
            if kept:
                raise ValidationError(f"{prefix}{GROUPS}{gid}", "group",
                                      f"deleted while {len(kept)} rules of it remain")
            new.groups.pop(gid, None)
            continue
        if got is None:  # only rules deleted
            if old is not None:
                new.groups[gid] = replace(old, tags=dict(old.tags), rules=kept)
            continue
        if got.rules:
            kept = sorted([*kept, *got.rules], key=_order)
        meta = old if gid in only_rules else got
        assert meta is not None
        new.groups[gid] = replace(meta, tags=dict(meta.tags), rules=kept)
    new.patched_from(state)
    return validate(new, since=state)


def diff(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> Tuple[KeyValues, List[str]]:
    """(keys to put with their values, keys to delete) that turn ``old`` into ``new``."""
    puts = {k: v for k, v in new.items() if old.get(k) != v}
    return puts, sorted(k for k in old if k not in new)
