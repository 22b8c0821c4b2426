"""CloudFormation templates (YAML or JSON).

Resources understood: ``AWS::EC2::SecurityGroup``, ``SecurityGroupIngress``,
``SecurityGroupEgress``, ``PrefixList``, ``NetworkInterface``; intrinsics
``Ref``, ``Fn::GetAtt``, ``Fn::Sub``, ``Fn::Join``, ``Fn::Select`` (long and
short ``!`` forms). ``AWS::StackName`` is the file stem unless given.
Physical ids are derived from logical ids: ``WebSG`` -> ``sg-websg``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import yaml

from ..model import (
    EGRESS,
    INGRESS,
    MODE_WORKLOAD,
    PrefixList,
    PrefixListEntry,
    Rule,
    SecurityGroup,
    State,
    ValidationError,
    default_egress,
    parse_cidr,
)
from .aws import interface_from, permission_rules, tags_of, tracking_timeouts

SG = "AWS::EC2::SecurityGroup"
SG_IN = "AWS::EC2::SecurityGroupIngress"
SG_OUT = "AWS::EC2::SecurityGroupEgress"
PL = "AWS::EC2::PrefixList"
ENI = "AWS::EC2::NetworkInterface"
KNOWN = (SG, SG_IN, SG_OUT, PL, ENI)


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns ``!Ref x`` into ``{"Ref": "x"}`` and so on."""


def _tag(name: str, split_dot: bool = False):  # type: ignore[no-untyped-def]
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            val: Any = loader.construct_scalar(node)
            if split_dot:
                val = str(val).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            val = loader.construct_sequence(node, deep=True)
        else:
            val = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: val}
    return construct


_CfnLoader.add_constructor("!Ref", _tag("Ref"))
_CfnLoader.add_constructor("!GetAtt", _tag("Fn::GetAtt", split_dot=True))
for _short in ("Sub", "Join", "Select", "Split", "ImportValue", "Base64"):
    _CfnLoader.add_constructor(f"!{_short}", _tag(f"Fn::{_short}"))


def parse_text(text: str) -> Any:
    return yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


def is_template(doc: Any) -> bool:
    return isinstance(doc, dict) and ("Resources" in doc or "AWSTemplateFormatVersion" in doc)


def _slug(logical: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", logical.lower())


class _Template:
    def __init__(self, doc: Dict[str, Any], stack_name: str) -> None:
        self.resources: Dict[str, Any] = doc.get("Resources") or {}
        if not isinstance(self.resources, dict):
            raise ValidationError("template", "Resources", "must be a mapping")
        self.params: Dict[str, Any] = {}
        for name, p in (doc.get("Parameters") or {}).items():
            if isinstance(p, dict) and "Default" in p:
                self.params[name] = p["Default"]
        self.pseudo = {"AWS::StackName": stack_name, "AWS::Region": "local",
                       "AWS::AccountId": "000000000000", "AWS::Partition": "aws",
                       "AWS::NoValue": None, "AWS::URLSuffix": "amazonaws.com"}
        self.physical: Dict[str, str] = {}
        prefixes = {SG: "sg", PL: "pl", ENI: "eni", SG_IN: "sgr", SG_OUT: "sgr"}
        for logical, res in self.resources.items():
            if not isinstance(res, dict) or "Type" not in res:
                raise ValidationError(logical, "Type", "every resource needs a Type")
            pre = prefixes.get(res["Type"])
            if pre:
                self.physical[logical] = f"{pre}-{_slug(logical)}"

    def ref(self, name: str, where: str) -> Any:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        if name in self.physical:
            return self.physical[name]
        raise ValidationError(where, "Ref", f"unknown resource or parameter {name!r}")

    def getatt(self, logical: str, attr: str, where: str) -> Any:
        if logical not in self.physical:
            raise ValidationError(where, "Fn::GetAtt", f"unknown resource {logical!r}")
        if attr in ("GroupId", "Id", "PrefixListId"):
            return self.physical[logical]
        if attr == "GroupName":
            props = self.resources[logical].get("Properties") or {}
            return self.resolve(props.get("GroupName") or self.physical[logical], where)
        raise ValidationError(where, "Fn::GetAtt", f"attribute {logical}.{attr} is not supported")

    def sub(self, text: str, variables: Dict[str, Any], where: str) -> str:
        def repl(m: re.Match[str]) -> str:
            key = m.group(1)
            if key.startswith("!"):
                return "${" + key[1:] + "}"
            if key in variables:
                return str(self.resolve(variables[key], where))
            if "." in key and key.split(".", 1)[0] in self.physical:
                logical, attr = key.split(".", 1)
                return str(self.getatt(logical, attr, where))
            return str(self.ref(key, where))
        return re.sub(r"\$\{([^}]+)\}", repl, text)

    def resolve(self, val: Any, where: str) -> Any:
        """Evaluate intrinsic functions recursively."""
        if isinstance(val, list):
            return [self.resolve(v, where) for v in val]
        if not isinstance(val, dict):
            return val
        if len(val) == 1:
            (key, arg), = val.items()
            if key == "Ref":
                return self.ref(str(arg), where)
            if key == "Fn::GetAtt":
                parts = arg.split(".", 1) if isinstance(arg, str) else arg
                if not isinstance(parts, list) or len(parts) != 2:
                    raise ValidationError(where, "Fn::GetAtt", f"bad argument {arg!r}")
                return self.getatt(str(parts[0]), str(parts[1]), where)
            if key == "Fn::Sub":
                if isinstance(arg, list):
                    return self.sub(str(arg[0]), arg[1] if len(arg) > 1 else {}, where)
                return self.sub(str(arg), {}, where)
            if key == "Fn::Join":
                delim, items = arg
                return str(delim).join(str(x) for x in self.resolve(items, where))
            if key == "Fn::Select":
                idx, items = arg
                return self.resolve(items, where)[int(self.resolve(idx, where))]
            if key.startswith("Fn::"):
                raise ValidationError(where, key, "intrinsic function not supported")
        return {k: self.resolve(v, where) for k, v in val.items()}

    def props(self, logical: str) -> Dict[str, Any]:
        props = self.resources[logical].get("Properties") or {}
        if not isinstance(props, dict):
            raise ValidationError(logical, "Properties", "must be a mapping")
        return self.resolve(props, logical)


def _rule_to_permission(spec: Dict[str, Any], direction: str) -> Dict[str, Any]:
    """Turn a CloudFormation rule (one peer, flat keys) into an IpPermission."""
    perm: Dict[str, Any] = {"IpProtocol": spec.get("IpProtocol"), "FromPort": spec.get("FromPort"),
                            "ToPort": spec.get("ToPort")}
    desc = spec.get("Description")
    pre = "Source" if direction == INGRESS else "Destination"
    peers = []
    if spec.get("CidrIp") is not None:
        perm["IpRanges"] = [{"CidrIp": spec["CidrIp"], "Description": desc}]
        peers.append("CidrIp")
    if spec.get("CidrIpv6") is not None:
        perm["Ipv6Ranges"] = [{"CidrIpv6": spec["CidrIpv6"], "Description": desc}]
        peers.append("CidrIpv6")
    if spec.get(f"{pre}PrefixListId") is not None:
        perm["PrefixListIds"] = [{"PrefixListId": spec[f"{pre}PrefixListId"], "Description": desc}]
        peers.append(f"{pre}PrefixListId")
    gid = spec.get(f"{pre}SecurityGroupId")
    gname = spec.get(f"{pre}SecurityGroupName")
    if gid is not None or gname is not None:
        pair = {"GroupId": gid} if gid is not None else {"GroupName": gname}
        perm["UserIdGroupPairs"] = [dict(pair, Description=desc)]
        peers.append(f"{pre}SecurityGroupId")
    if len(peers) != 1:
        raise ValidationError("rule", "CidrIp", "exactly one of CidrIp, CidrIpv6, "
                              f"{pre}PrefixListId, {pre}SecurityGroupId is required "
                              f"(got {peers or 'none'})")
    return perm


def load(doc: Dict[str, Any], stack_name: str) -> State:
    tpl = _Template(doc, stack_name)
    state = State()
    by_name: Dict[str, str] = {}
    inline_egress: Dict[str, bool] = {}
    for logical, res in tpl.resources.items():
        if res["Type"] == SG:
            p = tpl.props(logical)
            gid = tpl.physical[logical]
            name = str(p.get("GroupName") or f"{stack_name}-{logical}")
            if p.get("GroupDescription") is None:
                raise ValidationError(logical, "GroupDescription", "required")
            state.groups[gid] = SecurityGroup(gid, name, str(p["GroupDescription"]),
                                              tags_of(p.get("Tags"), logical))
            by_name[name] = gid
            inline_egress[gid] = p.get("SecurityGroupEgress") is not None
        elif res["Type"] == PL:
            p = tpl.props(logical)
            plid = tpl.physical[logical]
            fam = str(p.get("AddressFamily", "")).lower()
            if fam not in ("ipv4", "ipv6"):
                raise ValidationError(logical, "AddressFamily",
                                      f"{p.get('AddressFamily')!r} is not IPv4 or IPv6")
            entries = [PrefixListEntry(parse_cidr(e.get("Cidr"), logical, f"Entries[{j}].Cidr"),
                                       str(e.get("Description") or ""))
                       for j, e in enumerate(p.get("Entries") or [])]
            if p.get("MaxEntries") is None:
                raise ValidationError(logical, "MaxEntries", "required")
            state.prefix_lists[plid] = PrefixList(plid, str(p.get("PrefixListName") or logical),
                                                  4 if fam == "ipv4" else 6,
                                                  int(p["MaxEntries"]), entries)

    def add(gid: str, direction: str, spec: Any, where: str) -> None:
        if not isinstance(spec, dict):
            raise ValidationError(where, "Properties", "a rule must be a mapping")
        if gid not in state.groups:
            raise ValidationError(where, "GroupId", f"unknown group {gid!r}")
        try:
            perm = _rule_to_permission(spec, direction)
        except ValidationError as e:
            raise ValidationError(where, e.fieldname, e.message) from None
        rules: List[Rule] = permission_rules(gid, direction, perm, where, by_name)
        state.groups[gid].rules.extend(rules)

    for logical, res in tpl.resources.items():
        if res["Type"] == SG:
            p = tpl.props(logical)
            gid = tpl.physical[logical]
            for key, direction in (("SecurityGroupIngress", INGRESS),
                                   ("SecurityGroupEgress", EGRESS)):
                for j, spec in enumerate(p.get(key) or []):
                    add(gid, direction, spec, f"{logical}.{key}[{j}]")
        elif res["Type"] in (SG_IN, SG_OUT):
            p = tpl.props(logical)
            ref: Optional[str] = p.get("GroupId")
            if ref is None and p.get("GroupName") is not None:
                ref = by_name.get(str(p["GroupName"]))
            if ref is None:
                raise ValidationError(logical, "GroupId", "required (a !Ref or !GetAtt X.GroupId)")
            add(str(ref), INGRESS if res["Type"] == SG_IN else EGRESS, p, logical)
        elif res["Type"] == ENI:
            p = tpl.props(logical)
            tags = tags_of(p.get("Tags"), logical)
            doc_eni: Dict[str, Any] = {
                "NetworkInterfaceId": tpl.physical[logical],
                "PrivateIpAddress": p.get("PrivateIpAddress"),
                "PrivateIpAddresses": p.get("PrivateIpAddresses"),
                "Ipv6Addresses": p.get("Ipv6Addresses"),
                "Description": p.get("Description"),
                "SourceDestCheck": p.get("SourceDestCheck", True),
                "MacAddress": tags.get("host-interface-mac"),
            }
            eni = interface_from(doc_eni, logical, [str(g) for g in p.get("GroupSet") or []], tags)
            track = p.get("ConnectionTrackingSpecification")
            if track is not None:
                eni.timeouts = tracking_timeouts(track, logical)
            eni.mode = tags.get("host-interface-mode", MODE_WORKLOAD)
            state.interfaces[eni.eni_id] = eni

    ipv6 = state.uses_ipv6()
    for gid, group in state.groups.items():
        if not inline_egress[gid]:
            group.rules.extend(default_egress(gid, ipv6))
    return state


def stack_name_for(path: Optional[str]) -> str:
    if not path:
        return "stack"
    base = path.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] or "stack"
