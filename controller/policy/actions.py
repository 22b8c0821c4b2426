"""The EC2-shaped actions of the API, as pure functions on a State.

Each mutating action changes a *copy* of the state (the daemon validates the
copy and only then makes it current), so every call is all-or-nothing.
Errors carry EC2's error codes (``InvalidPermission.Duplicate``,
``InvalidGroup.NotFound``, ...). Request and response shapes follow the EC2
API's JSON names (``GroupId``, ``IpPermissions``, ``SecurityGroupRules``...).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import secrets
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from controller.policy.errors import ApiError, ValidationError
from controller.policy.formats import aws
from controller.policy.model import (
    DEFAULT_GROUP_NAME,
    EGRESS,
    INGRESS,
    PROTO_ALL,
    NetworkInterface,
    Peer,
    PrefixList,
    PrefixListEntry,
    Rule,
    SecurityGroup,
    State,
    check_id,
    default_egress,
    make_rule,
    parse_address,
    parse_bool,
    parse_cidr,
    parse_mac,
    protocol_label,
    validate,
)
from controller.policy.vocabulary import (
    SETTING_TAGS,
    TAG_ADDRESSES,
    TAG_DEVICE,
    TAG_MAC,
    TAG_MODE,
    TAG_NODE,
    TAG_REVALIDATE,
    TRACKING_TIMEOUTS,
    exactly_one,
    family_name,
    parse_family,
    user_tags,
)

Params = Dict[str, Any]
Result = Dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(9)[:17]}"


# --------------------------------------------------------------------------- params


def _required(p: Params, key: str) -> Any:
    if p.get(key) is None:
        raise ApiError("MissingParameter", f"The request must contain the parameter {key}")
    return p[key]


def _list_param(p: Params, key: str) -> List[Any]:
    val = p.get(key)
    if val is None:
        return []
    if not isinstance(val, list):
        raise ApiError("InvalidParameterValue", f"{key} must be a list")
    return val


def _names(p: Params, key: str) -> List[str]:
    """A list of ids or names: strings only."""
    out = _list_param(p, key)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise ApiError("InvalidParameterValue", f"{key}[{i}] {v!r} is not a string")
    return out


def _str_param(p: Params, key: str, default: str = "") -> str:
    val = p.get(key, default)
    if val is None:
        return default
    if not isinstance(val, str):
        raise ApiError("InvalidParameterValue", f"{key} must be a string")
    return val


def _tags(p: Params, resource: str) -> Dict[str, str]:
    """``TagSpecifications`` for one resource type (plus a plain ``Tags`` list)."""
    tags: Dict[str, str] = {}
    for spec in _list_param(p, "TagSpecifications"):
        if not isinstance(spec, dict):
            raise ApiError("InvalidParameterValue", "TagSpecifications items must be objects")
        if spec.get("ResourceType", resource) != resource:
            raise ApiError("InvalidParameterValue",
                           f"TagSpecifications: ResourceType must be {resource}")
        tags.update(aws.tags_of(spec.get("Tags"), resource, "TagSpecifications.Tags"))
    tags.update(aws.tags_of(p.get("Tags"), resource))
    return tags


def _filters(p: Params) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for f in _list_param(p, "Filters"):
        if not isinstance(f, dict) or not isinstance(f.get("Name"), str):
            raise ApiError("InvalidParameterValue", "Filters items must be {Name, Values}")
        values = f.get("Values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ApiError("InvalidParameterValue", f"filter {f['Name']}: Values must be strings")
        out[f["Name"]] = values
    return out


# what a Describe* filter reads of one object: filter name -> the object's values
Fields = Dict[str, Callable[[Any], Iterable[Any]]]


def _filtered(p: Params, objects: Iterable[Any], fields: Fields,
              tags: Optional[Callable[[Any], Dict[str, str]]] = None) -> List[Any]:
    """EC2's ``Filters``: an object passes when, for every filter, one of its
    values matches one of the filter's (``*`` and ``?`` are wildcards).
    ``tag:<key>`` and ``tag-key``/``tag-value`` need ``tags``; any other
    name is refused, as EC2 does."""
    checks: List[Callable[[Any], Iterable[Any]]] = []
    wanted: List[List[str]] = []

    def tag(key: str) -> Callable[[Any], Iterable[Any]]:
        assert tags is not None
        return lambda o: [v for k, v in tags(o).items() if k == key]
    for name, values in _filters(p).items():
        if name in fields:
            checks.append(fields[name])
        elif tags is not None and name.startswith("tag:"):
            checks.append(tag(name[4:]))
        elif tags is not None and name == "tag-key":
            checks.append(lambda o: list(tags(o)))  # type: ignore[misc]
        elif tags is not None and name == "tag-value":
            checks.append(lambda o: list(tags(o).values()))  # type: ignore[misc]
        else:
            raise ApiError("InvalidParameterValue", f"The filter '{name}' is invalid")
        wanted.append(values)

    def match(obj: Any) -> bool:
        for get, values in zip(checks, wanted):
            have = [_filter_text(v) for v in get(obj)]
            if not any(fnmatch.fnmatchcase(h, w.replace("[", "[[]")) for h in have
                       for w in values):
                return False
        return True
    return [o for o in objects if match(o)]


def _filter_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


MAX_RESULTS = 1000


def _page(p: Params, items: List[Result], id_key: Any, list_key: str,
          least: int = 5) -> Result:
    """``MaxResults``/``NextToken``: items in id order, a page at a time; the
    token names the last id given (opaque to the caller)."""
    size, token = p.get("MaxResults"), p.get("NextToken")
    if size is None and token is None:
        return {list_key: items}
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not least <= size <= MAX_RESULTS):
        raise ApiError("InvalidParameterValue",
                       f"MaxResults {size!r} is outside {least}-{MAX_RESULTS}")
    id_of: Callable[[Result], str] = id_key if callable(id_key) else \
        (lambda it: str(it[id_key]))
    items = sorted(items, key=id_of)
    if token is not None:
        try:
            after = json.loads(base64.urlsafe_b64decode(_key(token, "NextToken")))["after"]
            assert isinstance(after, str)
        except (ValueError, KeyError, TypeError, AssertionError, binascii.Error):
            raise ApiError("InvalidNextToken", "The token is not valid") from None
        items = [it for it in items if id_of(it) > after]
    size = size or MAX_RESULTS
    out: Result = {list_key: items[:size]}
    if len(items) > size:
        last = id_of(items[size - 1])
        out["NextToken"] = base64.urlsafe_b64encode(json.dumps({"after": last}).encode()).decode()
    return out


# --------------------------------------------------------------------------- lookups


def _key(value: Any, what: str) -> str:
    """An id or name to look up: a string, never a list or a number."""
    if not isinstance(value, str):
        raise ApiError("InvalidParameterValue", f"{what} {value!r} is not a string")
    return value


def find_group(state: State, p: Params) -> SecurityGroup:
    gid, name = p.get("GroupId"), p.get("GroupName")
    gid = None if gid is None else _key(gid, "GroupId")
    name = None if name is None else _key(name, "GroupName")
    if gid is not None:
        if gid not in state.groups:
            raise ApiError("InvalidGroup.NotFound", f"The security group '{gid}' does not exist")
        return state.groups[gid]
    if name is not None:
        for g in state.groups.values():
            if g.name == name:
                return g
        raise ApiError("InvalidGroup.NotFound", f"The security group '{name}' does not exist")
    raise ApiError("MissingParameter", "The request must contain the parameter GroupId or GroupName")


def find_prefix_list(state: State, plid: Any) -> PrefixList:
    if _key(plid, "PrefixListId") not in state.prefix_lists:
        raise ApiError("InvalidPrefixListID.NotFound", f"The prefix list ID '{plid}' does not exist")
    return state.prefix_lists[plid]


def find_interface(state: State, eid: Any) -> NetworkInterface:
    if _key(eid, "NetworkInterfaceId") not in state.interfaces:
        raise ApiError("InvalidNetworkInterfaceID.NotFound",
                       f"The networkInterface ID '{eid}' does not exist")
    return state.interfaces[eid]


def _check_references(state: State, rules: Iterable[Rule]) -> None:
    for r in rules:
        if r.peer.kind == "sg" and r.peer.value not in state.groups:
            raise ApiError("InvalidGroup.NotFound",
                           f"The security group '{r.peer.value}' does not exist")
        if r.peer.kind == "pl" and r.peer.value not in state.prefix_lists:
            raise ApiError("InvalidPrefixListID.NotFound",
                           f"The prefix list ID '{r.peer.value}' does not exist")


# --------------------------------------------------------------------------- describe shapes


def rule_shape(r: Rule) -> Result:
    """A rule as ``DescribeSecurityGroupRules`` prints it."""
    out: Result = {"SecurityGroupRuleId": r.rule_id, "GroupId": r.group_id,
                   "IsEgress": r.direction == EGRESS,
                   "IpProtocol": "-1" if r.protocol == PROTO_ALL else protocol_label(r.protocol),
                   "FromPort": r.from_port, "ToPort": r.to_port}
    if r.peer.kind == "cidr":
        out["CidrIpv4" if r.peer.network.version == 4 else "CidrIpv6"] = r.peer.value
    elif r.peer.kind == "pl":
        out["PrefixListId"] = r.peer.value
    else:
        out["ReferencedGroupInfo"] = {"GroupId": r.peer.value}
    if r.description:
        out["Description"] = r.description
    if r.tags:
        out["Tags"] = [{"Key": k, "Value": v} for k, v in r.tags]
    return out


def permissions_shape(rules: Iterable[Rule]) -> List[Result]:
    """Rules -> ``IpPermissions`` (rules with the same protocol/ports share one)."""
    perms: Dict[Tuple[int, int, int], Result] = {}
    for r in rules:
        key = (r.protocol, r.from_port, r.to_port)
        if key not in perms:
            perm: Result = {"IpProtocol": "-1" if r.protocol == PROTO_ALL
                            else protocol_label(r.protocol),
                            "IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [],
                            "UserIdGroupPairs": []}
            if r.protocol != PROTO_ALL:
                perm["FromPort"], perm["ToPort"] = r.from_port, r.to_port
            perms[key] = perm
        perm = perms[key]
        desc = {"Description": r.description} if r.description else {}
        if r.peer.kind == "cidr" and r.peer.network.version == 4:
            perm["IpRanges"].append({"CidrIp": r.peer.value, **desc})
        elif r.peer.kind == "cidr":
            perm["Ipv6Ranges"].append({"CidrIpv6": r.peer.value, **desc})
        elif r.peer.kind == "pl":
            perm["PrefixListIds"].append({"PrefixListId": r.peer.value, **desc})
        else:
            perm["UserIdGroupPairs"].append({"GroupId": r.peer.value, **desc})
    return list(perms.values())


def _tag_list(tags: Dict[str, str]) -> List[Result]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def group_shape(g: SecurityGroup) -> Result:
    out = {"GroupId": g.group_id, "GroupName": g.name, "Description": g.description,
           "IpPermissions": permissions_shape(g.rules_in(INGRESS)),
           "IpPermissionsEgress": permissions_shape(g.rules_in(EGRESS)),
           "Tags": _tag_list(g.tags)}
    if g.vpc_id:
        out["VpcId"] = g.vpc_id
    return out


def prefix_list_shape(p: PrefixList) -> Result:
    return {"PrefixListId": p.prefix_list_id, "PrefixListName": p.name,
            "AddressFamily": family_name(p.family), "MaxEntries": p.max_entries,
            "Version": p.version, "State": "create-complete", "Tags": _tag_list(p.tags)}


def interface_tags(e: NetworkInterface) -> Dict[str, str]:
    """The user's tags and the settings carried as tags (vocabulary)."""
    tags = dict(e.tags)
    if e.device:
        tags[TAG_DEVICE] = e.device
        tags[TAG_MODE] = e.mode
    if e.watch_addresses:
        tags[TAG_ADDRESSES] = "watch"
    if e.revalidate:
        tags[TAG_REVALIDATE] = "true"
    if e.node is not None:
        tags[TAG_NODE] = e.node
    return tags


def interface_shape(e: NetworkInterface) -> Result:
    tags = interface_tags(e)
    t = e.timeouts
    ll = e.link_local()
    return {"NetworkInterfaceId": e.eni_id, "Description": e.description,
            "Groups": [{"GroupId": g} for g in e.groups],
            "PrivateIpAddress": str(e.ipv4[0]) if e.ipv4 else None,
            "PrivateIpAddresses": [{"PrivateIpAddress": str(a), "Primary": i == 0}
                                   for i, a in enumerate(e.ipv4)],
            "Ipv6Addresses": [{"Ipv6Address": str(a)} for a in e.ipv6],
            "SourceDestCheck": e.source_dest_check, "MacAddress": e.mac_address,
            "Ipv6LinkLocalAddress": str(ll) if ll is not None else None,
            "ConnectionTrackingConfiguration": {key: getattr(t, attr)
                                                for key, attr in TRACKING_TIMEOUTS},
            "TagSet": _tag_list(tags)}


# --------------------------------------------------------------------------- security groups


def create_security_group(state: State, p: Params) -> Result:
    name = _str_param(p, "GroupName")
    if not name:
        raise ApiError("MissingParameter", "The request must contain the parameter GroupName")
    if name == DEFAULT_GROUP_NAME:
        raise ApiError("InvalidParameterValue",
                       f"Cannot use reserved security group name: {DEFAULT_GROUP_NAME}")
    if len(name) > 255 or name.startswith("sg-"):
        raise ApiError("InvalidParameterValue",
                       f"Invalid value '{name}' for GroupName: at most 255 characters, "
                       "not starting with sg-")
    desc = _str_param(p, "Description")
    if not desc:
        raise ApiError("MissingParameter", "The request must contain the parameter Description")
    if any(g.name == name for g in state.groups.values()):
        raise ApiError("InvalidGroup.Duplicate", f"The security group '{name}' already exists")
    vpc = _str_param(p, "VpcId")
    if len(vpc) > 255:
        raise ApiError("InvalidParameterValue", "VpcId: at most 255 characters")
    gid = new_id("sg")
    state.groups[gid] = SecurityGroup(gid, name, desc, _tags(p, "security-group"),
                                      default_egress(gid, state.uses_ipv6()), vpc_id=vpc)
    return {"GroupId": gid}


def delete_security_group(state: State, p: Params) -> Result:
    g = find_group(state, p)
    if g.name == DEFAULT_GROUP_NAME:
        raise ApiError("CannotDelete", f"the default group {g.group_id} cannot be deleted")
    users = [e.eni_id for e in state.interfaces.values() if g.group_id in e.groups]
    if users:
        raise ApiError("DependencyViolation",
                       f"resource {g.group_id} has a dependent object: {', '.join(users)}")
    refs = sorted({r.group_id for other in state.groups.values() if other is not g
                   for r in other.rules if r.peer == Peer("sg", g.group_id)})
    if refs:
        raise ApiError("DependencyViolation",
                       f"resource {g.group_id} is referenced by {', '.join(refs)}")
    del state.groups[g.group_id]
    return {"Return": True, "GroupId": g.group_id}


def _permissions(state: State, g: SecurityGroup, direction: str, p: Params) -> List[Rule]:
    perms = _list_param(p, "IpPermissions")
    if not perms:
        raise ApiError("MissingParameter", "The request must contain the parameter IpPermissions")
    by_name = {x.name: x.group_id for x in state.groups.values()}
    rules: List[Rule] = []
    for i, perm in enumerate(perms):
        rules += aws.permission_rules(g.group_id, direction, perm, f"IpPermissions[{i}]", by_name)
    return rules


def _authorize(direction: str) -> Callable[[State, Params], Result]:
    def action(state: State, p: Params) -> Result:
        g = find_group(state, p)
        new = _permissions(state, g, direction, p)
        _check_references(state, new)
        have = {r.identity(): r for r in g.rules}
        for r in new:
            if r.identity() in have:
                raise ApiError("InvalidPermission.Duplicate",
                               f"the specified rule \"peer: {r.peer}, {protocol_label(r.protocol)} "
                               f"{r.describe_ports()}, {direction}\" already exists "
                               f"({have[r.identity()].rule_id})")
            have[r.identity()] = r
        tags = tuple(sorted(_tags(p, "security-group-rule").items()))
        if tags:
            new = [replace(r, tags=tags) for r in new]
        g.rules.extend(new)
        return {"Return": True, "SecurityGroupRules": [rule_shape(r) for r in new]}
    return action


def _revoke(direction: str) -> Callable[[State, Params], Result]:
    def action(state: State, p: Params) -> Result:
        g = find_group(state, p)
        ids = _names(p, "SecurityGroupRuleIds")
        if ids and p.get("IpPermissions"):
            raise ApiError("InvalidParameterCombination",
                           "give IpPermissions or SecurityGroupRuleIds, not both")
        gone: List[Rule] = []
        if ids:
            by_id = {r.rule_id: r for r in g.rules_in(direction)}
            for rid in ids:
                if rid not in by_id:
                    raise ApiError("InvalidSecurityGroupRuleId.NotFound",
                                   f"The security group rule ID '{rid}' does not exist in "
                                   f"{g.group_id} {direction}")
                gone.append(by_id.pop(rid))
        else:
            have = {r.identity(): r for r in g.rules}
            for r in _permissions(state, g, direction, p):
                if r.identity() not in have:
                    raise ApiError("InvalidPermission.NotFound",
                                   f"The specified rule does not exist in this security group: "
                                   f"{protocol_label(r.protocol)} {r.describe_ports()} "
                                   f"peer {r.peer} ({direction})")
                gone.append(have.pop(r.identity()))
        drop = {r.rule_id for r in gone}
        g.rules = [r for r in g.rules if r.rule_id not in drop]
        return {"Return": True, "RevokedSecurityGroupRules": [rule_shape(r) for r in gone]}
    return action


def _peer_values(rules: Iterable[Rule], kind: str, version: int = 0) -> List[str]:
    return [r.peer.value for r in rules if r.peer.kind == kind
            and (not version or r.peer.network.version == version)]


def _permission_fields(prefix: str, direction: str) -> Fields:
    """``ip-permission.*`` (ingress) and ``egress.ip-permission.*`` filters."""
    def rules(g: SecurityGroup) -> List[Rule]:
        return g.rules_in(direction)
    return {
        f"{prefix}.protocol": lambda g: ["-1" if r.protocol == PROTO_ALL
                                         else protocol_label(r.protocol) for r in rules(g)],
        f"{prefix}.from-port": lambda g: [r.from_port for r in rules(g)],
        f"{prefix}.to-port": lambda g: [r.to_port for r in rules(g)],
        f"{prefix}.cidr": lambda g: _peer_values(rules(g), "cidr", 4),
        f"{prefix}.ipv6-cidr": lambda g: _peer_values(rules(g), "cidr", 6),
        f"{prefix}.group-id": lambda g: _peer_values(rules(g), "sg"),
        f"{prefix}.prefix-list-id": lambda g: _peer_values(rules(g), "pl"),
    }


GROUP_FIELDS: Fields = {
    "group-id": lambda g: [g.group_id],
    "group-name": lambda g: [g.name],
    "description": lambda g: [g.description],
    "vpc-id": lambda g: [g.vpc_id] if g.vpc_id else [],
    **_permission_fields("ip-permission", INGRESS),
    **_permission_fields("egress.ip-permission", EGRESS),
}


def describe_security_groups(state: State, p: Params) -> Result:
    groups = list(state.groups.values())
    for gid in _names(p, "GroupIds"):
        find_group(state, {"GroupId": gid})
    for name in _names(p, "GroupNames"):
        find_group(state, {"GroupName": name})
    if p.get("GroupIds") or p.get("GroupNames"):
        ids, names = set(_names(p, "GroupIds")), set(_names(p, "GroupNames"))
        groups = [g for g in groups if g.group_id in ids or g.name in names]
    groups = _filtered(p, groups, GROUP_FIELDS, lambda g: g.tags)
    return _page(p, [group_shape(g) for g in groups], "GroupId", "SecurityGroups")


def _all_rules(state: State) -> List[Rule]:
    return [r for g in state.groups.values() for r in g.rules]


RULE_FIELDS: Fields = {
    "group-id": lambda r: [r.group_id],
    "security-group-rule-id": lambda r: [r.rule_id],
}


def describe_security_group_rules(state: State, p: Params) -> Result:
    rules = _all_rules(state)
    ids = _names(p, "SecurityGroupRuleIds")
    if ids:
        known = {r.rule_id for r in rules}
        for rid in ids:
            if rid not in known:
                raise ApiError("InvalidSecurityGroupRuleId.NotFound",
                               f"The security group rule ID '{rid}' does not exist")
        rules = [r for r in rules if r.rule_id in ids]
    for gid in _filters(p).get("group-id", []):
        if not any(c in gid for c in "*?"):
            find_group(state, {"GroupId": gid})
    rules = _filtered(p, rules, RULE_FIELDS, lambda r: dict(r.tags))
    return _page(p, [rule_shape(r) for r in rules], "SecurityGroupRuleId", "SecurityGroupRules")


def modify_security_group_rules(state: State, p: Params) -> Result:
    g = find_group(state, {"GroupId": _required(p, "GroupId")})
    updates = _list_param(p, "SecurityGroupRules")
    if not updates:
        raise ApiError("MissingParameter",
                       "The request must contain the parameter SecurityGroupRules")
    index = {r.rule_id: i for i, r in enumerate(g.rules)}
    for n, u in enumerate(updates):
        obj = f"SecurityGroupRules[{n}]"
        if not isinstance(u, dict):
            raise ApiError("InvalidParameterValue", f"{obj} must be an object")
        rid = u.get("SecurityGroupRuleId")
        if rid not in index:
            raise ApiError("InvalidSecurityGroupRuleId.NotFound",
                           f"The security group rule ID '{rid}' does not exist in {g.group_id}")
        old = g.rules[index[rid]]
        spec = u.get("SecurityGroupRule")
        if not isinstance(spec, dict):
            raise ApiError("MissingParameter", f"{obj}: SecurityGroupRule is required")
        key = exactly_one(spec, ("CidrIpv4", "CidrIpv6", "PrefixListId", "ReferencedGroupId"),
                          obj, code="InvalidParameterCombination")
        if key in ("CidrIpv4", "CidrIpv6"):
            peer = Peer.cidr(parse_cidr(spec[key], obj, key, 4 if key == "CidrIpv4" else 6))
        elif key == "PrefixListId":
            peer = Peer("pl", check_id("pl", spec[key], obj, key))
        else:
            peer = Peer("sg", check_id("sg", spec[key], obj, key))
        new = make_rule(g.group_id, old.direction, _required(spec, "IpProtocol"),
                        spec.get("FromPort"), spec.get("ToPort"), peer,
                        spec.get("Description"), rid, obj=obj)
        _check_references(state, [new])
        clash = [r for r in g.rules if r.identity() == new.identity() and r.rule_id != rid]
        if clash:
            raise ApiError("InvalidPermission.Duplicate",
                           f"{obj}: the rule already exists as {clash[0].rule_id}")
        g.rules[index[rid]] = new
    return {"Return": True}


# --------------------------------------------------------------------------- prefix lists


def _entries(items: List[Any], family: int, where: str) -> List[PrefixListEntry]:
    out = []
    for i, e in enumerate(items):
        if not isinstance(e, dict):
            raise ApiError("InvalidParameterValue", f"{where}[{i}] must be {{Cidr, Description}}")
        out.append(PrefixListEntry(parse_cidr(e.get("Cidr"), where, f"[{i}].Cidr", family,
                                              strict=True),
                                   aws.text_field(e, "Description", f"{where}[{i}]")))
    return out


def _family(p: Params) -> int:
    return parse_family(_required(p, "AddressFamily"), "request")


def _max_entries(p: Params) -> int:
    m = _required(p, "MaxEntries")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ApiError("InvalidParameterValue", f"Invalid value '{m}' for MaxEntries")
    return m


def create_managed_prefix_list(state: State, p: Params) -> Result:
    name = _str_param(p, "PrefixListName")
    if not name:
        raise ApiError("MissingParameter", "The request must contain the parameter PrefixListName")
    family, max_entries = _family(p), _max_entries(p)
    entries = _entries(_list_param(p, "Entries"), family, "Entries")
    plid = new_id("pl")
    state.prefix_lists[plid] = PrefixList(plid, name, family, max_entries, entries, 1,
                                          _tags(p, "prefix-list"))
    return {"PrefixList": prefix_list_shape(state.prefix_lists[plid])}


def modify_managed_prefix_list(state: State, p: Params) -> Result:
    pl = find_prefix_list(state, _required(p, "PrefixListId"))
    cur = p.get("CurrentVersion")
    if cur is not None and cur != pl.version:
        raise ApiError("PrefixListVersionMismatch",
                       f"The prefix list {pl.prefix_list_id} is at version {pl.version}, "
                       f"not {cur}")
    if p.get("PrefixListName") is not None:
        pl.name = _str_param(p, "PrefixListName")
    if p.get("MaxEntries") is not None:
        pl.max_entries = _max_entries(p)
    have = {e.cidr: e for e in pl.entries}
    for i, e in enumerate(_list_param(p, "RemoveEntries")):
        cidr = parse_cidr(e.get("Cidr") if isinstance(e, dict) else None, "RemoveEntries",
                          f"[{i}].Cidr", pl.family)
        if cidr not in have:
            raise ApiError("InvalidParameterValue",
                           f"RemoveEntries[{i}]: {cidr} is not in {pl.prefix_list_id}")
        del have[cidr]
    for i, e in enumerate(_entries(_list_param(p, "AddEntries"), pl.family, "AddEntries")):
        if e.cidr in have:
            raise ApiError("InvalidParameterValue",
                           f"AddEntries[{i}]: {e.cidr} is already in {pl.prefix_list_id}")
        have[e.cidr] = e
    if len(have) > pl.max_entries:
        raise ApiError("PrefixListMaxEntriesExceeded",
                       f"{len(have)} entries exceed MaxEntries {pl.max_entries} of "
                       f"{pl.prefix_list_id}")
    pl.entries = list(have.values())
    pl.version += 1
    return {"PrefixList": prefix_list_shape(pl)}


def delete_managed_prefix_list(state: State, p: Params) -> Result:
    pl = find_prefix_list(state, _required(p, "PrefixListId"))
    refs = sorted({r.group_id for r in _all_rules(state)
                   if r.peer == Peer("pl", pl.prefix_list_id)})
    if refs:
        raise ApiError("DependencyViolation",
                       f"prefix list {pl.prefix_list_id} is referenced by {', '.join(refs)}")
    del state.prefix_lists[pl.prefix_list_id]
    return {"PrefixList": {**prefix_list_shape(pl), "State": "delete-complete"}}


def _described(p: Params, key: str, objects: Dict[str, Any],
               find: Callable[[str], Any]) -> List[Any]:
    """The objects a Describe* call names in ``key`` (each must exist), or all."""
    ids = _names(p, key)
    for i in ids:
        find(i)
    return [o for i, o in objects.items() if not ids or i in ids]


PREFIX_LIST_FIELDS: Fields = {
    "prefix-list-id": lambda pl: [pl.prefix_list_id],
    "prefix-list-name": lambda pl: [pl.name],
    "address-family": lambda pl: [family_name(pl.family)],
}


def describe_managed_prefix_lists(state: State, p: Params) -> Result:
    pls = _described(p, "PrefixListIds", state.prefix_lists, lambda i: find_prefix_list(state, i))
    pls = _filtered(p, pls, PREFIX_LIST_FIELDS, lambda pl: pl.tags)
    return _page(p, [prefix_list_shape(pl) for pl in pls], "PrefixListId", "PrefixLists", 1)


def get_managed_prefix_list_entries(state: State, p: Params) -> Result:
    pl = find_prefix_list(state, _required(p, "PrefixListId"))
    return _page(p, [{"Cidr": str(e.cidr), **({"Description": e.description}
                                               if e.description else {})}
                     for e in pl.entries], "Cidr", "Entries", 1)


# --------------------------------------------------------------------------- interfaces


def _groups_param(state: State, p: Params) -> List[str]:
    groups = _names(p, "Groups")
    for gid in groups:
        find_group(state, {"GroupId": gid})
    return [str(g) for g in groups]


def create_network_interface(state: State, p: Params) -> Result:
    tags = _tags(p, "network-interface")
    doc = {"NetworkInterfaceId": new_id("eni"), "Description": p.get("Description"),
           "PrivateIpAddress": p.get("PrivateIpAddress"),
           "PrivateIpAddresses": p.get("PrivateIpAddresses"),
           "Ipv6Addresses": p.get("Ipv6Addresses"),
           "SourceDestCheck": p.get("SourceDestCheck", True), "MacAddress": p.get("MacAddress"),
           "ConnectionTrackingConfiguration": p.get("ConnectionTrackingSpecification")}
    if p.get("Node") is not None:
        tags[TAG_NODE] = _str_param(p, "Node")
    eni = aws.interface_from(doc, "CreateNetworkInterface", _groups_param(state, p), tags)
    eni.tags = user_tags(tags)
    state.interfaces[eni.eni_id] = eni
    return {"NetworkInterface": interface_shape(eni)}


def modify_network_interface_attribute(state: State, p: Params) -> Result:
    eni = find_interface(state, _required(p, "NetworkInterfaceId"))
    if p.get("Groups") is not None:
        eni.groups = _groups_param(state, p)
    if p.get("ConnectionTrackingSpecification") is not None:
        cur = eni.timeouts
        t = aws.tracking_timeouts(p["ConnectionTrackingSpecification"], eni.eni_id)
        for spec_key, attr in TRACKING_TIMEOUTS:
            if p["ConnectionTrackingSpecification"].get(spec_key) is not None:
                setattr(cur, attr, getattr(t, attr))
    if p.get("Description") is not None:
        d = p["Description"]
        eni.description = aws.text_field(d if isinstance(d, dict) else {"Value": d}, "Value",
                                         "Description")
    if p.get("SourceDestCheck") is not None:  # EC2: {"Value": false}
        v = p["SourceDestCheck"]
        eni.source_dest_check = parse_bool(v.get("Value") if isinstance(v, dict) else v,
                                           eni.eni_id, "SourceDestCheck")
    return {"Return": True}


def delete_network_interface(state: State, p: Params) -> Result:
    eni = find_interface(state, _required(p, "NetworkInterfaceId"))
    del state.interfaces[eni.eni_id]
    return {"Return": True}


INTERFACE_FIELDS: Fields = {
    "network-interface-id": lambda e: [e.eni_id],
    "group-id": lambda e: e.groups,
    "description": lambda e: [e.description],
    "private-ip-address": lambda e: [str(a) for a in e.ipv4],
    "addresses.private-ip-address": lambda e: [str(a) for a in e.ipv4],
    "ipv6-addresses.ipv6-address": lambda e: [str(a) for a in e.ipv6],
    "mac-address": lambda e: [e.mac_address] if e.mac_address else [],
    "source-dest-check": lambda e: [e.source_dest_check],
}


def describe_network_interfaces(state: State, p: Params) -> Result:
    enis = _described(p, "NetworkInterfaceIds", state.interfaces,
                      lambda i: find_interface(state, i))
    enis = _filtered(p, enis, INTERFACE_FIELDS, interface_tags)
    return _page(p, [interface_shape(e) for e in enis], "NetworkInterfaceId",
                 "NetworkInterfaces")


def _assign(unassign: bool) -> Callable[[State, Params], Result]:
    def action(state: State, p: Params) -> Result:
        eni = find_interface(state, _required(p, "NetworkInterfaceId"))
        v4 = [parse_address(a, eni.eni_id, "PrivateIpAddresses", 4)
              for a in _list_param(p, "PrivateIpAddresses")]
        v6 = [parse_address(a, eni.eni_id, "Ipv6Addresses", 6)
              for a in _list_param(p, "Ipv6Addresses")]
        for have, addrs in ((eni.ipv4, v4), (eni.ipv6, v6)):
            for a in addrs:
                if unassign and a not in have:
                    raise ApiError("InvalidParameterValue", f"{a} is not assigned to {eni.eni_id}")
                if not unassign and a in have:
                    raise ApiError("InvalidParameterValue",
                                   f"{a} is already assigned to {eni.eni_id}")
                if unassign:
                    have.remove(a)  # type: ignore[arg-type]
                else:
                    have.append(a)  # type: ignore[arg-type]
        return {"Return": True, "NetworkInterfaceId": eni.eni_id}
    return action


# --------------------------------------------------------------------------- tags

@dataclass
class _RuleRef:
    """A rule to tag: rules are immutable, so tagging replaces it in its group."""
    group: SecurityGroup
    rule: Rule


TagTarget = Union[SecurityGroup, NetworkInterface, PrefixList, _RuleRef]


def _tag_target(state: State, rid: Any) -> TagTarget:
    rid = _key(rid, "Resources")
    if rid.startswith("sg-"):
        return find_group(state, {"GroupId": rid})
    if rid.startswith("eni-"):
        return find_interface(state, rid)
    if rid.startswith("pl-"):
        return find_prefix_list(state, rid)
    if rid.startswith("sgr-"):
        for g in state.groups.values():
            for r in g.rules:
                if r.rule_id == rid:
                    return _RuleRef(g, r)
        raise ApiError("InvalidSecurityGroupRuleId.NotFound",
                       f"The security group rule ID '{rid}' does not exist")
    raise ApiError("InvalidID", f"The ID '{rid}' is not valid")


def _retag(obj: TagTarget, tags: Dict[str, str]) -> None:
    """Give an object these tags; an interface's setting tags (vocabulary:
    device, mode, node, ...) set what they name."""
    if isinstance(obj, (SecurityGroup, PrefixList)):
        obj.tags = tags
    elif isinstance(obj, _RuleRef):
        rules = obj.group.rules
        i = next(i for i, r in enumerate(rules) if r is obj.rule)
        obj.rule = rules[i] = replace(obj.rule, tags=tuple(sorted(tags.items())))
    else:
        for name, value in aws.tag_settings(tags).items():
            setattr(obj, name, value)
        if TAG_MAC in tags:
            obj.mac_address = parse_mac(tags[TAG_MAC], obj.eni_id, TAG_MAC)
        obj.tags = user_tags(tags)


def _all_tags(obj: TagTarget) -> Dict[str, str]:
    if isinstance(obj, _RuleRef):
        return dict(obj.rule.tags)
    if isinstance(obj, NetworkInterface):
        return interface_tags(obj)
    return dict(obj.tags)


def _resources(state: State, p: Params) -> List[TagTarget]:
    ids = _names(p, "Resources")
    if not ids:
        raise ApiError("MissingParameter", "The request must contain the parameter Resources")
    return [_tag_target(state, rid) for rid in dict.fromkeys(ids)]


def create_tags(state: State, p: Params) -> Result:
    objs = _resources(state, p)
    tags = aws.tags_of(_required(p, "Tags"), "CreateTags")
    for obj in objs:
        _retag(obj, {**_all_tags(obj), **tags})
    return {"Return": True}


def delete_tags(state: State, p: Params) -> Result:
    """EC2: a tag given with a value goes only if the value matches; without
    ``Tags``, every user tag goes (settings carried as tags stay)."""
    objs = _resources(state, p)
    given = _list_param(p, "Tags")
    for i, t in enumerate(given):
        if not isinstance(t, dict) or not isinstance(t.get("Key"), str) \
                or not isinstance(t.get("Value", ""), str):
            raise ApiError("InvalidParameterValue", f"Tags[{i}] is not a {{Key, Value}}")
    for obj in objs:
        tags = _all_tags(obj)
        if p.get("Tags") is None:
            tags = {k: v for k, v in tags.items() if k in SETTING_TAGS}
        for t in given:
            if t["Key"] in tags and ("Value" not in t or tags[t["Key"]] == t["Value"]):
                del tags[t["Key"]]
        _retag(obj, tags)
    return {"Return": True}


TAG_FIELDS: Fields = {
    "resource-id": lambda t: [t["ResourceId"]],
    "resource-type": lambda t: [t["ResourceType"]],
    "key": lambda t: [t["Key"]],
    "value": lambda t: [t["Value"]],
}


def describe_tags(state: State, p: Params) -> Result:
    found: List[Result] = []

    def add(kind: str, rid: str, tags: Dict[str, str]) -> None:
        found.extend({"Key": k, "ResourceId": rid, "ResourceType": kind, "Value": v}
                     for k, v in sorted(tags.items()))
    for g in state.groups.values():
        add("security-group", g.group_id, g.tags)
        for r in g.rules:
            add("security-group-rule", r.rule_id, dict(r.tags))
    for e in state.interfaces.values():
        add("network-interface", e.eni_id, interface_tags(e))
    for pl in state.prefix_lists.values():
        add("prefix-list", pl.prefix_list_id, pl.tags)
    found = _filtered(p, found, TAG_FIELDS)
    return _page(p, found, lambda t: f"{t['ResourceId']}\0{t['Key']}", "Tags")


# --------------------------------------------------------------------------- table

# name -> (function, mutates)
ACTIONS: Dict[str, Tuple[Callable[[State, Params], Result], bool]] = {
    "CreateSecurityGroup": (create_security_group, True),
    "DeleteSecurityGroup": (delete_security_group, True),
    "AuthorizeSecurityGroupIngress": (_authorize(INGRESS), True),
    "AuthorizeSecurityGroupEgress": (_authorize(EGRESS), True),
    "RevokeSecurityGroupIngress": (_revoke(INGRESS), True),
    "RevokeSecurityGroupEgress": (_revoke(EGRESS), True),
    "ModifySecurityGroupRules": (modify_security_group_rules, True),
    "DescribeSecurityGroups": (describe_security_groups, False),
    "DescribeSecurityGroupRules": (describe_security_group_rules, False),
    "CreateManagedPrefixList": (create_managed_prefix_list, True),
    "ModifyManagedPrefixList": (modify_managed_prefix_list, True),
    "DeleteManagedPrefixList": (delete_managed_prefix_list, True),
    "DescribeManagedPrefixLists": (describe_managed_prefix_lists, False),
    "GetManagedPrefixListEntries": (get_managed_prefix_list_entries, False),
    "CreateNetworkInterface": (create_network_interface, True),
    "ModifyNetworkInterfaceAttribute": (modify_network_interface_attribute, True),
    "DeleteNetworkInterface": (delete_network_interface, True),
    "DescribeNetworkInterfaces": (describe_network_interfaces, False),
    "AssignPrivateIpAddresses": (_assign(False), True),
    "UnassignPrivateIpAddresses": (_assign(True), True),
    "CreateTags": (create_tags, True),
    "DeleteTags": (delete_tags, True),
    "DescribeTags": (describe_tags, False),
}


def run(state: State, action: str, params: Optional[Params]) -> Result:
    """Run one action on ``state`` (a copy, for mutating actions: a DryRun,
    or any error, leaves the copy to be dropped). ValidationError from the
    formats becomes ``InvalidParameterValue``."""
    if action not in ACTIONS:
        raise ApiError("InvalidAction", f"The action {action} is not valid for this web service")
    if params is not None and not isinstance(params, dict):
        raise ApiError("InvalidParameterValue", "the request body must be a JSON object")
    fn, mutates = ACTIONS[action]
    p = params or {}
    try:
        result = fn(state, p)
        if p.get("DryRun") is not None and parse_bool(p["DryRun"], action, "DryRun"):
            if mutates:  # the change would have to pass as a whole
                validate(state)
            raise ApiError("DryRunOperation",
                           "Request would have succeeded, but DryRun flag is set.", 412)
        return result
    except ValidationError as exc:
        raise ApiError(exc.code, str(exc)) from None
