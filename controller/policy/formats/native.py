"""The native YAML format (documented in the README).

    sgctl: 1
    groups:
      sg-web:
        name: web
        ingress:
          - {proto: tcp, ports: 80-81, from: 0.0.0.0/0, description: http}
          - {proto: icmp, type: 8, code: -1, from: pl-office}
        egress: []            # absent = the AWS default (all to 0.0.0.0/0 [, ::/0])
    prefix_lists:
      pl-office: {family: ipv4, max_entries: 5, entries: [198.18.5.0/24]}
    interfaces:
      eni-web1: {groups: [sg-web], ipv4: [198.18.0.10], device: veth-web1, mode: workload}
    settings: {exempt: [169.254.169.254/32], exempt_dhcp: true}
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

from controller.policy.errors import ValidationError
from controller.policy.formats.fields import mapping, seq, tag_map, text
from controller.policy.model import (
    DIRECTIONS,
    EGRESS,
    INGRESS,
    MODE_WORKLOAD,
    NetworkInterface,
    Peer,
    PrefixList,
    PrefixListEntry,
    Rule,
    SecurityGroup,
    Settings,
    State,
    Timeouts,
    check_id,
    default_egress,
    make_rule,
    parse_address,
    parse_bool,
    parse_cidr,
    parse_int,
    parse_mac,
)
from controller.policy.vocabulary import NATIVE_FAMILIES, parse_family

NATIVE_KEYS = ("sgctl", "groups", "interfaces", "prefix_lists", "settings")


def is_native(doc: Any) -> bool:
    return isinstance(doc, dict) and any(k in doc for k in NATIVE_KEYS)


def _check_keys(d: Dict[str, Any], allowed: Tuple[str, ...], obj: str) -> None:
    for k in d:
        if k not in allowed:
            raise ValidationError(obj, str(k), f"unknown field (allowed: {', '.join(allowed)})")


def parse_peer(val: Any, obj: str, key: str) -> Peer:
    if not isinstance(val, str):
        raise ValidationError(obj, key, f"{val!r} is not a CIDR, pl- or sg- id")
    if val.startswith("pl-"):
        return Peer("pl", check_id("pl", val, obj, key))
    if val.startswith("sg-"):
        return Peer("sg", check_id("sg", val, obj, key))
    return Peer.cidr(parse_cidr(val, obj, key))


def parse_ports(spec: Dict[str, Any], obj: str) -> Tuple[Optional[object], Optional[object]]:
    """``ports: 80`` / ``"80-90"`` / ``all``; or ``type``/``code`` for ICMP."""
    if "type" in spec or "code" in spec:
        return spec.get("type", -1), spec.get("code", -1)
    ports = spec.get("ports")
    if ports is None:
        return None, None
    if isinstance(ports, int) and not isinstance(ports, bool):
        return ports, ports
    text = str(ports).strip()
    if text in ("all", "-1"):
        return 0, 65535
    if "-" in text[1:]:
        lo, hi = text.split("-", 1)
        return lo.strip(), hi.strip()
    return text, text


_RULE_KEYS = ("proto", "protocol", "ports", "type", "code", "from", "to", "peer", "description", "id",
              "tags")


def load(doc: Dict[str, Any]) -> State:
    _check_keys(doc, NATIVE_KEYS, "document")
    if doc.get("sgctl", 1) != 1:
        raise ValidationError("document", "sgctl", f"unknown format version {doc['sgctl']!r}")
    state = State()
    sets = mapping(doc.get("settings"), "settings", "settings")
    _check_keys(sets, ("exempt", "exempt_dhcp", "dhcp_servers", "exempt_force",
                       "max_groups_per_interface", "max_rules_per_interface",
                       "conntrack_allowance", "conntrack_limit"), "settings")
    settings = Settings()
    if "exempt" in sets:
        settings.exempt = [parse_cidr(c, "settings", f"exempt[{i}]")
                           for i, c in enumerate(seq(sets["exempt"], "settings", "exempt"))]
    if "exempt_dhcp" in sets:
        settings.exempt_dhcp = parse_bool(sets["exempt_dhcp"], "settings", "exempt_dhcp")
    if "dhcp_servers" in sets:
        servers = sets["dhcp_servers"] or []
        if not isinstance(servers, list):
            raise ValidationError("settings", "dhcp_servers", "must be a list of addresses/CIDRs")
        settings.dhcp_servers = [parse_cidr(c, "settings", f"dhcp_servers[{i}]")
                                 for i, c in enumerate(servers)]
    if "exempt_force" in sets:
        settings.exempt_force = parse_bool(sets["exempt_force"], "settings", "exempt_force")
    for k, least in (("max_groups_per_interface", 1), ("max_rules_per_interface", 1),
                     ("conntrack_allowance", 0), ("conntrack_limit", 0)):  # (0: automatic)
        if k in sets:
            if not isinstance(sets[k], int) or isinstance(sets[k], bool) or sets[k] < least:
                raise ValidationError("settings", k, f"{sets[k]!r} must be a positive integer"
                                      + (" or 0 (automatic)" if least == 0 else ""))
            setattr(settings, k, sets[k])
    state.settings = settings

    for plid, p in mapping(doc.get("prefix_lists"), "document", "prefix_lists").items():
        check_id("pl", plid, str(plid), "id")
        p = mapping(p, plid, "prefix list")
        _check_keys(p, ("name", "family", "max_entries", "entries", "version", "tags"), plid)
        fam = parse_family(p.get("family", "ipv4"), plid, "family", NATIVE_FAMILIES)
        entries = []
        for j, e in enumerate(seq(p.get("entries"), plid, "entries")):
            if isinstance(e, dict):
                _check_keys(e, ("cidr", "description"), f"{plid} entries[{j}]")
                entries.append(PrefixListEntry(parse_cidr(e.get("cidr"), plid, f"entries[{j}]"),
                                               text(e.get("description"), plid, "description")))
            else:
                entries.append(PrefixListEntry(parse_cidr(e, plid, f"entries[{j}]")))
        state.prefix_lists[plid] = PrefixList(
            plid, text(p.get("name"), plid, "name", plid), fam,
            parse_int(p.get("max_entries", max(len(entries), 1)), plid, "max_entries"),
            entries, parse_int(p.get("version", 1), plid, "version"),
            {str(k): v for k, v in tag_map(p.get("tags"), plid).items()})

    ifaces = mapping(doc.get("interfaces"), "document", "interfaces")
    for eid, e in ifaces.items():
        check_id("eni", eid, str(eid), "id")
        e = mapping(e, eid, "interface")
        _check_keys(e, ("groups", "ipv4", "ipv6", "device", "mode", "timeouts", "description",
                       "watch_addresses", "revalidate", "source_dest_check", "mac_address",
                       "node", "tags"), eid)
        t = mapping(e.get("timeouts"), eid, "timeouts")
        _check_keys(t, tuple(Timeouts.__dataclass_fields__), f"{eid} timeouts")
        groups = seq(e.get("groups"), eid, "groups")
        state.interfaces[eid] = NetworkInterface(
            eni_id=eid,
            groups=[check_id("sg", g, eid, f"groups[{i}]") for i, g in enumerate(groups)],
            ipv4=[parse_address(a, eid, f"ipv4[{i}]", 4)  # type: ignore[misc]
                  for i, a in enumerate(seq(e.get("ipv4"), eid, "ipv4"))],
            ipv6=[parse_address(a, eid, f"ipv6[{i}]", 6)  # type: ignore[misc]
                  for i, a in enumerate(seq(e.get("ipv6"), eid, "ipv6"))],
            timeouts=Timeouts(**t),
            device=None if e.get("device") is None else text(e.get("device"), eid, "device"),
            mode=text(e.get("mode"), eid, "mode", MODE_WORKLOAD),
            description=text(e.get("description"), eid, "description"),
            watch_addresses=parse_bool(e.get("watch_addresses", False), eid, "watch_addresses"),
            revalidate=parse_bool(e.get("revalidate", False), eid, "revalidate"),
            source_dest_check=parse_bool(e.get("source_dest_check", True), eid,
                                         "source_dest_check"),
            mac_address=None if e.get("mac_address") is None else parse_mac(
                e["mac_address"], eid, "mac_address"),
            node=None if e.get("node") is None else text(e.get("node"), eid, "node"),
            tags=tag_map(e.get("tags"), eid))

    ipv6 = state.uses_ipv6()
    for gid, g in mapping(doc.get("groups"), "document", "groups").items():
        check_id("sg", gid, str(gid), "id")
        g = mapping(g, gid, "group")
        _check_keys(g, ("name", "description", "tags", "vpc_id", "ingress", "egress"), gid)
        tags = tag_map(g.get("tags"), gid)
        group = SecurityGroup(gid, text(g.get("name"), gid, "name", gid),
                              text(g.get("description"), gid, "description"),
                              {str(k): v for k, v in tags.items()},
                              vpc_id=text(g.get("vpc_id"), gid, "vpc_id"))
        if len(group.vpc_id) > 255:
            raise ValidationError(gid, "vpc_id", f"{len(group.vpc_id)} characters, at most 255")
        for direction in DIRECTIONS:
            specs = g.get(direction)
            if specs is None:
                if direction == EGRESS:
                    group.rules.extend(default_egress(gid, ipv6))
                continue
            if not isinstance(specs, list):
                raise ValidationError(gid, direction, "must be a list of rules")
            peer_key = "from" if direction == INGRESS else "to"
            for i, spec in enumerate(specs):
                where = f"{gid} {direction}[{i}]"
                spec = mapping(spec, where, "rule")
                _check_keys(spec, _RULE_KEYS, where)
                peer_val = spec.get(peer_key, spec.get("peer"))
                if peer_val is None:
                    raise ValidationError(where, peer_key, "required (a CIDR, pl- or sg- id)")
                lo, hi = parse_ports(spec, where)
                proto = spec.get("proto", spec.get("protocol"))
                if proto is None:
                    raise ValidationError(where, "proto", "required")
                rule = make_rule(gid, direction, proto, lo, hi,
                                 parse_peer(peer_val, where, peer_key),
                                 spec.get("description"), spec.get("id"), obj=where)
                if spec.get("tags"):
                    rule = replace(rule, tags=tuple(sorted(tag_map(spec["tags"], where).items())))
                group.rules.append(rule)
        state.groups[gid] = group
    return state


def rule_spec(r: Rule) -> Dict[str, Any]:
    """One rule in the native words."""
    spec: Dict[str, Any] = {"proto": r.protocol, "id": r.rule_id}
    if r.has_ports:
        spec["ports"] = f"{r.from_port}-{r.to_port}"
    elif r.has_type_code:
        spec["type"], spec["code"] = r.from_port, r.to_port
    spec["from" if r.direction == INGRESS else "to"] = r.peer.value
    if r.description:
        spec["description"] = r.description
    if r.tags:
        spec["tags"] = dict(r.tags)
    return spec


class SpecCache:
    """``rule_spec`` remembered per rule object for the next dump (rules are
    immutable and shared by copies of a state, so a dump after a change
    builds only the changed rules' specs). The specs are shared: read only.
    A rule is known by ``id()``: the cache holds every rule it knows, so
    no other object can have the id of one."""

    def __init__(self) -> None:
        self.last: Dict[int, Tuple[Rule, str, Dict[str, Any]]] = {}
        self.now: Dict[int, Tuple[Rule, str, Dict[str, Any]]] = {}

    def group(self, rules: List[Rule]) -> Dict[str, List[Dict[str, Any]]]:
        ids = list(map(id, rules))
        hits = list(map(self.last.get, ids))
        for i, hit in enumerate(hits):
            if hit is None:
                r = rules[i]
                hits[i] = (r, r.direction, rule_spec(r))
        self.now.update(zip(ids, hits))  # type: ignore[arg-type]
        return {d: [h[2] for h in hits if h[1] == d]  # type: ignore[index]
                for d in DIRECTIONS}

    def done(self) -> None:
        """The dump is over: what it used is what the next one starts from."""
        self.last, self.now = self.now, {}


def dump(state: State, cache: Optional[SpecCache] = None) -> Dict[str, Any]:
    """State -> native document (the store, ``sgctl status -o yaml``, tests)."""
    out: Dict[str, Any] = {"sgctl": 1, "groups": {}, "prefix_lists": {}, "interfaces": {}}
    specs = cache or SpecCache()  # (a fresh one: every spec built once)
    for gid, g in state.groups.items():
        d: Dict[str, Any] = {"name": g.name, "description": g.description,
                             **specs.group(g.rules)}
        if g.tags:
            d["tags"] = dict(g.tags)
        if g.vpc_id:
            d["vpc_id"] = g.vpc_id
        out["groups"][gid] = d
    for plid, p in state.prefix_lists.items():
        out["prefix_lists"][plid] = {"name": p.name, "family": f"ipv{p.family}",
                                     "max_entries": p.max_entries, "version": p.version,
                                     "entries": [{"cidr": str(e.cidr), "description": e.description}
                                                 for e in p.entries]}
        if p.tags:
            out["prefix_lists"][plid]["tags"] = dict(p.tags)
    for eid, e in state.interfaces.items():
        out["interfaces"][eid] = {
            "groups": list(e.groups), "ipv4": [str(a) for a in e.ipv4],
            "ipv6": [str(a) for a in e.ipv6], "device": e.device, "mode": e.mode,
            "timeouts": dict(vars(e.timeouts)), "description": e.description,
            "watch_addresses": e.watch_addresses, "revalidate": e.revalidate,
            "source_dest_check": e.source_dest_check, "mac_address": e.mac_address}
        if e.node is not None:
            out["interfaces"][eid]["node"] = e.node
        if e.tags:
            out["interfaces"][eid]["tags"] = dict(e.tags)
    out["settings"] = {"exempt": [str(c) for c in state.settings.exempt],
                       "exempt_dhcp": state.settings.exempt_dhcp,
                       "dhcp_servers": [str(c) for c in state.settings.dhcp_servers],
                       "exempt_force": state.settings.exempt_force,
                       "max_groups_per_interface": state.settings.max_groups_per_interface,
                       "max_rules_per_interface": state.settings.max_rules_per_interface,
                       "conntrack_allowance": state.settings.conntrack_allowance,
                       "conntrack_limit": state.settings.conntrack_limit}
    return out

