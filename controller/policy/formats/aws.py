"""AWS JSON: the shapes printed by ``aws ec2 describe-*``.

Accepted top-level keys (any subset): ``SecurityGroups`` (with ``IpPermissions``
and ``IpPermissionsEgress``), ``SecurityGroupRules``, ``PrefixLists`` (each with
``Entries``), ``NetworkInterfaces``. An interface is bound to a local device by
the tag ``host-interface``; ``host-interface-mode`` is ``workload`` or ``host``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from controller.policy.errors import ValidationError
from controller.policy.formats.fields import mapping, seq
from controller.policy.model import (
    EGRESS,
    INGRESS,
    MODE_WORKLOAD,
    NetworkInterface,
    Peer,
    PrefixList,
    PrefixListEntry,
    Rule,
    SecurityGroup,
    State,
    Timeouts,
    check_aws_text,
    check_id,
    make_rule,
    parse_address,
    parse_bool,
    parse_cidr,
    parse_int,
    parse_mac,
)
from controller.policy.vocabulary import (
    TAG_ADDRESSES,
    TAG_DEVICE,
    TAG_MODE,
    TAG_NODE,
    TAG_REVALIDATE,
    TRACKING_TIMEOUTS,
    exactly_one,
    parse_family,
)

AWS_KEYS = ("SecurityGroups", "SecurityGroupRules", "PrefixLists", "NetworkInterfaces")


def text_field(doc: Dict[str, Any], key: str, obj: str, default: str = "",
               aws_chars: bool = False) -> str:
    """An optional string field (never a list or a number silently str()-ed)."""
    val = doc.get(key)
    if val is None:
        return default
    if not isinstance(val, str):
        raise ValidationError(obj, key, f"{val!r} is not a string")
    if len(val) > 255:
        raise ValidationError(obj, key, f"{len(val)} characters, at most 255")
    return check_aws_text(val, obj, key) if aws_chars else val


def tags_of(items: Any, obj: str, key: str = "Tags") -> Dict[str, str]:
    if items is None:
        return {}
    if not isinstance(items, list):
        raise ValidationError(obj, key, "must be a list of {Key, Value}")
    out: Dict[str, str] = {}
    for t in items:
        if not isinstance(t, dict) or not isinstance(t.get("Key"), str) \
                or not isinstance(t.get("Value", ""), str):
            raise ValidationError(obj, key, f"{t!r} is not a {{Key, Value}} tag of strings")
        if t["Key"] in out:
            raise ValidationError(obj, key, f"tag {t['Key']!r} is given twice")
        out[t["Key"]] = t.get("Value", "")
    return out


def permission_rules(group_id: str, direction: str, perm: Dict[str, Any], obj: str,
                     group_by_name: Optional[Dict[str, str]] = None) -> List[Rule]:
    """One ``IpPermission`` with N peers -> N rules (1.1)."""
    perm = mapping(perm, obj, "IpPermissions", required=True)
    proto = perm.get("IpProtocol")
    if proto is None:
        raise ValidationError(obj, "IpProtocol", "required")
    args = (group_id, direction, proto, perm.get("FromPort"), perm.get("ToPort"))
    rules: List[Rule] = []
    for i, r in enumerate(seq(perm.get("IpRanges"), obj, "IpRanges")):
        r = mapping(r, obj, f"IpRanges[{i}]", required=True)
        net = parse_cidr(r.get("CidrIp"), obj, f"IpRanges[{i}].CidrIp", 4, strict=True)
        rules.append(make_rule(*args, Peer.cidr(net), r.get("Description"), obj=obj, strict=True))
    for i, r in enumerate(seq(perm.get("Ipv6Ranges"), obj, "Ipv6Ranges")):
        r = mapping(r, obj, f"Ipv6Ranges[{i}]", required=True)
        net = parse_cidr(r.get("CidrIpv6"), obj, f"Ipv6Ranges[{i}].CidrIpv6", 6, strict=True)
        rules.append(make_rule(*args, Peer.cidr(net), r.get("Description"), obj=obj, strict=True))
    for i, r in enumerate(seq(perm.get("PrefixListIds"), obj, "PrefixListIds")):
        r = mapping(r, obj, f"PrefixListIds[{i}]", required=True)
        plid = check_id("pl", r.get("PrefixListId"), obj, f"PrefixListIds[{i}].PrefixListId")
        rules.append(make_rule(*args, Peer("pl", plid), r.get("Description"), obj=obj,
                               strict=True))
    for i, r in enumerate(seq(perm.get("UserIdGroupPairs"), obj, "UserIdGroupPairs")):
        r = mapping(r, obj, f"UserIdGroupPairs[{i}]", required=True)
        gid = r.get("GroupId")
        if gid is None and r.get("GroupName") is not None and group_by_name is not None:
            gid = group_by_name.get(text_field(r, "GroupName", obj))
            if gid is None:
                raise ValidationError(obj, f"UserIdGroupPairs[{i}].GroupName",
                                      f"unknown group name {r['GroupName']!r}")
        check_id("sg", gid, obj, f"UserIdGroupPairs[{i}].GroupId")
        rules.append(make_rule(*args, Peer("sg", str(gid)), r.get("Description"), obj=obj,
                               strict=True))
    if not rules:
        raise ValidationError(obj, "IpPermissions",
                              "no peer: give IpRanges, Ipv6Ranges, PrefixListIds or UserIdGroupPairs")
    return rules


def sgr_rule(r: Dict[str, Any], obj: str) -> Rule:
    """One ``SecurityGroupRule`` (describe-security-group-rules shape)."""
    gid = check_id("sg", r.get("GroupId"), obj, "GroupId")
    direction = EGRESS if parse_bool(r.get("IsEgress", False), obj, "IsEgress") else INGRESS
    key = exactly_one(r, ("CidrIpv4", "CidrIpv6", "PrefixListId", "ReferencedGroupInfo"), obj)
    if key == "CidrIpv4":
        peer = Peer.cidr(parse_cidr(r[key], obj, key, 4, strict=True))
    elif key == "CidrIpv6":
        peer = Peer.cidr(parse_cidr(r[key], obj, key, 6, strict=True))
    elif key == "PrefixListId":
        peer = Peer("pl", check_id("pl", r[key], obj, key))
    else:
        ref = mapping(r[key], obj, key, required=True)
        peer = Peer("sg", check_id("sg", ref.get("GroupId"), obj, "ReferencedGroupInfo.GroupId"))
    return make_rule(gid, direction, r.get("IpProtocol"), r.get("FromPort"), r.get("ToPort"),
                     peer, r.get("Description"), r.get("SecurityGroupRuleId"), obj=obj, strict=True)


def tracking_timeouts(cfg: Any, obj: str) -> Timeouts:
    t = Timeouts()
    if cfg is None:
        return t
    cfg = mapping(cfg, obj, "ConnectionTrackingConfiguration", required=True)
    for key, attr in TRACKING_TIMEOUTS:
        if cfg.get(key) is not None:
            val = cfg[key]
            if isinstance(val, bool) or not isinstance(val, int):
                raise ValidationError(obj, f"ConnectionTrackingConfiguration.{key}",
                                      f"{val!r} is not a number of seconds")
            setattr(t, attr, val)
    return t


def tag_settings(tags: Dict[str, str]) -> Dict[str, Any]:
    """The interface fields its setting tags name (vocabulary): device,
    mode, address watching, revalidation, node."""
    return {"device": tags.get(TAG_DEVICE), "mode": tags.get(TAG_MODE, MODE_WORKLOAD),
            "watch_addresses": tags.get(TAG_ADDRESSES) == "watch",
            "revalidate": tags.get(TAG_REVALIDATE) == "true", "node": tags.get(TAG_NODE)}


def interface_from(doc: Dict[str, Any], obj: str, groups: List[str],
                   tags: Dict[str, str], bool_strings: bool = False) -> NetworkInterface:
    eid = check_id("eni", doc.get("NetworkInterfaceId"), obj, "NetworkInterfaceId")
    v4 = []
    if doc.get("PrivateIpAddress") is not None:
        v4.append(parse_address(doc["PrivateIpAddress"], eid, "PrivateIpAddress", 4))
    for i, a in enumerate(seq(doc.get("PrivateIpAddresses"), eid, "PrivateIpAddresses")):
        a = mapping(a, eid, f"PrivateIpAddresses[{i}]", required=True)
        addr = parse_address(a.get("PrivateIpAddress"), eid,
                             f"PrivateIpAddresses[{i}].PrivateIpAddress", 4)
        if addr not in v4:
            v4.append(addr)
    v6 = []
    for i, a in enumerate(seq(doc.get("Ipv6Addresses"), eid, "Ipv6Addresses")):
        a = mapping(a, eid, f"Ipv6Addresses[{i}]", required=True)
        addr = parse_address(a.get("Ipv6Address"), eid, f"Ipv6Addresses[{i}].Ipv6Address", 6)
        if addr not in v6:
            v6.append(addr)
    return NetworkInterface(
        eni_id=eid, groups=groups, ipv4=v4, ipv6=v6,  # type: ignore[arg-type]
        timeouts=tracking_timeouts(doc.get("ConnectionTrackingConfiguration"), eid),
        description=text_field(doc, "Description", eid), tags=tags, **tag_settings(tags),
        source_dest_check=parse_bool(doc.get("SourceDestCheck", True), eid, "SourceDestCheck",
                                     strings=bool_strings),
        mac_address=None if doc.get("MacAddress") is None else parse_mac(
            doc["MacAddress"], eid, "MacAddress"))


def load(doc: Dict[str, Any]) -> State:
    state = State()
    sgs = seq(doc.get("SecurityGroups"), "document", "SecurityGroups")
    by_name: Dict[str, str] = {}
    for i, g in enumerate(sgs):
        g = mapping(g, f"SecurityGroups[{i}]", "SecurityGroups", required=True)
        gid = check_id("sg", g.get("GroupId"), f"SecurityGroups[{i}]", "GroupId")
        if gid in state.groups:
            raise ValidationError(gid, "GroupId", "group listed twice")
        name = text_field(g, "GroupName", gid, gid)
        if name in by_name:
            raise ValidationError(gid, "GroupName", f"{name!r} is already used by {by_name[name]}")
        by_name[name] = gid
        state.groups[gid] = SecurityGroup(gid, name, text_field(g, "Description", gid,
                                                                aws_chars=True),
                                          tags_of(g.get("Tags"), gid),
                                          vpc_id=text_field(g, "VpcId", gid))
    for g in sgs:
        group = state.groups[g["GroupId"]]
        for direction, key in ((INGRESS, "IpPermissions"), (EGRESS, "IpPermissionsEgress")):
            for j, perm in enumerate(seq(g.get(key), group.group_id, key)):
                group.rules.extend(permission_rules(group.group_id, direction, perm,
                                                    f"{group.group_id} {key}[{j}]", by_name))
    for i, r in enumerate(seq(doc.get("SecurityGroupRules"), "document", "SecurityGroupRules")):
        obj = f"SecurityGroupRules[{i}]"
        rule = sgr_rule(mapping(r, obj, "SecurityGroupRules", required=True), obj)
        if rule.group_id not in state.groups:
            state.groups[rule.group_id] = SecurityGroup(rule.group_id, rule.group_id)
        state.groups[rule.group_id].rules.append(rule)
    for i, p in enumerate(seq(doc.get("PrefixLists"), "document", "PrefixLists")):
        obj = f"PrefixLists[{i}]"
        p = mapping(p, obj, "PrefixLists", required=True)
        plid = check_id("pl", p.get("PrefixListId"), obj, "PrefixListId")
        family = parse_family(p.get("AddressFamily", "IPv4"), plid)
        entries = []
        for j, e in enumerate(seq(p.get("Entries"), plid, "Entries")):
            e = mapping(e, plid, f"Entries[{j}]", required=True)
            entries.append(PrefixListEntry(parse_cidr(e.get("Cidr"), plid, f"Entries[{j}].Cidr",
                                                      family, strict=True),
                                           text_field(e, "Description", plid)))
        max_entries = parse_int(p.get("MaxEntries", max(len(entries), 1)), plid, "MaxEntries")
        version = parse_int(p.get("Version", 1), plid, "Version")
        if plid in state.prefix_lists:
            raise ValidationError(plid, "PrefixListId", "prefix list listed twice")
        state.prefix_lists[plid] = PrefixList(plid, text_field(p, "PrefixListName", plid, plid),
                                              family, max_entries, entries, version)
    for i, n in enumerate(seq(doc.get("NetworkInterfaces"), "document", "NetworkInterfaces")):
        obj = f"NetworkInterfaces[{i}]"
        n = mapping(n, obj, "NetworkInterfaces", required=True)
        groups = []
        for j, g in enumerate(seq(n.get("Groups"), obj, "Groups")):
            g = mapping(g, obj, f"Groups[{j}]", required=True)
            groups.append(check_id("sg", g.get("GroupId"), obj, f"Groups[{j}].GroupId"))
        eni = interface_from(n, obj, groups, tags_of(n.get("TagSet"), obj, "TagSet"))
        if eni.eni_id in state.interfaces:
            raise ValidationError(eni.eni_id, "NetworkInterfaceId", "interface listed twice")
        state.interfaces[eni.eni_id] = eni
    return state
