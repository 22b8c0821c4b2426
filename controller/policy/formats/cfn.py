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

from controller.policy.errors import ValidationError
from controller.policy.formats.aws import (
    interface_from,
    permission_rules,
    tags_of,
    text_field,
    tracking_timeouts,
)
from controller.policy.formats.fields import seq, string
from controller.policy.formats.text import parse_yaml
from controller.policy.model import (
    EGRESS,
    INGRESS,
    PrefixList,
    PrefixListEntry,
    Rule,
    SecurityGroup,
    State,
    check_aws_text,
    check_id,
    default_egress,
    parse_cidr,
    parse_int,
)
from controller.policy.vocabulary import TAG_MAC, parse_family

SG = "AWS::EC2::SecurityGroup"
SG_IN = "AWS::EC2::SecurityGroupIngress"
SG_OUT = "AWS::EC2::SecurityGroupEgress"
PL = "AWS::EC2::PrefixList"
ENI = "AWS::EC2::NetworkInterface"


def parse_text(text: str) -> Any:
    return parse_yaml(text)


def is_template(doc: Any) -> bool:
    return isinstance(doc, dict) and ("Resources" in doc or "AWSTemplateFormatVersion" in doc)


def _slug(logical: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", logical.lower())


MAX_RESOLVE_DEPTH = 32  # nested intrinsics (and GetAtt chains) before we call it a loop


def _pair(arg: Any, where: str, fn: str, shape: str) -> List[Any]:
    if not isinstance(arg, list) or len(arg) != 2:
        raise ValidationError(where, fn, f"takes [{shape}], got {arg!r}")
    return arg


class _Template:
    def __init__(self, doc: Dict[str, Any], stack_name: str) -> None:
        self.resources: Dict[str, Any] = doc.get("Resources") or {}
        if not isinstance(self.resources, dict):
            raise ValidationError("template", "Resources", "must be a mapping")
        params = doc.get("Parameters") or {}
        if not isinstance(params, dict):
            raise ValidationError("template", "Parameters", "must be a mapping")
        self.params: Dict[str, Any] = {}
        for name, p in params.items():
            if isinstance(p, dict) and "Default" in p:
                self.params[str(name)] = p["Default"]
        self.pseudo = {"AWS::StackName": stack_name, "AWS::Region": "local",
                       "AWS::AccountId": "000000000000", "AWS::Partition": "aws",
                       "AWS::NoValue": None, "AWS::URLSuffix": "amazonaws.com"}
        self.physical: Dict[str, str] = {}
        self.resolving: List[str] = []  # GetAtt GroupName chains in progress
        prefixes = {SG: "sg", PL: "pl", ENI: "eni", SG_IN: "sgr", SG_OUT: "sgr"}
        owner: Dict[str, str] = {}
        for logical, res in self.resources.items():
            if not isinstance(logical, str) or not re.fullmatch(r"[A-Za-z0-9]{1,58}", logical):
                raise ValidationError(str(logical), "(logical id)", "logical ids are 1-58 letters "
                                      "and digits (CloudFormation: alphanumeric)")
            if not isinstance(res, dict) or not isinstance(res.get("Type"), str):
                raise ValidationError(str(logical), "Type", "every resource needs a Type (a string)")
            pre = prefixes.get(res["Type"])
            if pre:
                phys = f"{pre}-{_slug(str(logical))}"
                if phys in owner:
                    raise ValidationError(str(logical), "(logical id)",
                                          f"becomes the id {phys}, as {owner[phys]} does: "
                                          "logical ids must differ in more than case and "
                                          "punctuation")
                owner[phys] = str(logical)
                self.physical[logical] = phys

    def ref(self, name: Any, where: str) -> Any:
        if not isinstance(name, str):
            raise ValidationError(where, "Ref", f"{name!r} is not a name")
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        if name in self.physical:
            return self.physical[name]
        raise ValidationError(where, "Ref", f"unknown resource or parameter {name!r}")

    def getatt(self, logical: str, attr: str, where: str, depth: int) -> Any:
        if logical not in self.physical:
            raise ValidationError(where, "Fn::GetAtt", f"unknown resource {logical!r}")
        if attr in ("GroupId", "Id", "PrefixListId"):
            return self.physical[logical]
        if attr == "GroupName" and self.resources[logical]["Type"] == SG:
            if logical in self.resolving:
                raise ValidationError(where, "Fn::GetAtt",
                                      f"{logical}.GroupName depends on itself")
            props = self.resources[logical].get("Properties") or {}
            name = props.get("GroupName") if isinstance(props, dict) else None
            self.resolving.append(logical)
            try:
                return self.resolve(name or self.physical[logical], where, depth + 1)
            finally:
                self.resolving.pop()
        raise ValidationError(where, "Fn::GetAtt", f"attribute {logical}.{attr} is not supported")

    def sub(self, text: Any, variables: Any, where: str, depth: int) -> str:
        text = string(text, where, "Fn::Sub")
        if not isinstance(variables, dict):
            raise ValidationError(where, "Fn::Sub", "the variables must be a mapping")

        def repl(m: re.Match[str]) -> str:
            key = m.group(1)
            if key.startswith("!"):
                return "${" + key[1:] + "}"
            if key in variables:
                return str(self.resolve(variables[key], where, depth + 1))
            if "." in key and key.split(".", 1)[0] in self.physical:
                logical, attr = key.split(".", 1)
                return str(self.getatt(logical, attr, where, depth))
            return str(self.ref(key, where))
        return re.sub(r"\$\{([^}]+)\}", repl, text)

    def resolve(self, val: Any, where: str, depth: int = 0) -> Any:
        """Evaluate intrinsic functions recursively."""
        if depth > MAX_RESOLVE_DEPTH:
            raise ValidationError(where, "Fn::*", f"intrinsics nested deeper than "
                                  f"{MAX_RESOLVE_DEPTH}")
        if isinstance(val, list):
            return [self.resolve(v, where, depth + 1) for v in val]
        if not isinstance(val, dict):
            return val
        if len(val) == 1:
            (key, arg), = val.items()
            if key == "Ref":
                return self.ref(arg, where)
            if key == "Fn::GetAtt":
                parts = arg.split(".", 1) if isinstance(arg, str) else arg
                if not isinstance(parts, list) or len(parts) != 2 \
                        or not all(isinstance(x, str) for x in parts):
                    raise ValidationError(where, "Fn::GetAtt", f"bad argument {arg!r} "
                                          "(Logical.Attribute)")
                return self.getatt(parts[0], parts[1], where, depth)
            if key == "Fn::Sub":
                if isinstance(arg, list):
                    text, variables = _pair(arg, where, key, "text, {variables}")
                    return self.sub(text, variables, where, depth)
                return self.sub(arg, {}, where, depth)
            if key == "Fn::Join":
                delim, items = _pair(arg, where, key, "delimiter, [values]")
                items = self.resolve(items, where, depth + 1)
                if not isinstance(items, list) or not all(isinstance(x, (str, int))
                                                          and not isinstance(x, bool)
                                                          for x in items):
                    raise ValidationError(where, key, "the values must be a list of strings")
                return string(delim, where, key).join(str(x) for x in items)
            if key == "Fn::Select":
                idx, items = _pair(arg, where, key, "index, [values]")
                idx = self.resolve(idx, where, depth + 1)
                items = self.resolve(items, where, depth + 1)
                if isinstance(idx, str) and idx.isdigit() and len(idx) < 6:
                    idx = int(idx)
                if not isinstance(items, list) or isinstance(idx, bool) \
                        or not isinstance(idx, int) or not 0 <= idx < len(items):
                    raise ValidationError(where, key, f"index {idx!r} is not in the list "
                                          f"{items!r}")
                return items[idx]
            if isinstance(key, str) and key.startswith("Fn::"):
                raise ValidationError(where, key, "intrinsic function not supported")
        return {k: self.resolve(v, where, depth + 1) for k, v in val.items()}

    def props(self, logical: str) -> Dict[str, Any]:
        props = self.resolve(self.resources[logical].get("Properties") or {}, logical)
        if not isinstance(props, dict):
            raise ValidationError(logical, "Properties", "must be a mapping")
        return props


def _rule_to_permissions(spec: Dict[str, Any], direction: str, where: str,
                         warnings: List[str]) -> List[Dict[str, Any]]:
    """A CloudFormation rule (flat keys, one peer) -> IpPermissions. Two
    peers of CidrIp and CidrIpv6 (which CloudFormation refuses) are taken as
    two rules, with a warning."""
    base: Dict[str, Any] = {"IpProtocol": spec.get("IpProtocol"), "FromPort": spec.get("FromPort"),
                            "ToPort": spec.get("ToPort")}
    desc = spec.get("Description")
    pre = "Source" if direction == INGRESS else "Destination"
    perms: List[Dict[str, Any]] = []
    if spec.get("CidrIp") is not None:
        perms.append(dict(base, IpRanges=[{"CidrIp": spec["CidrIp"], "Description": desc}]))
    if spec.get("CidrIpv6") is not None:
        perms.append(dict(base, Ipv6Ranges=[{"CidrIpv6": spec["CidrIpv6"], "Description": desc}]))
    cidrs = len(perms)
    if spec.get(f"{pre}PrefixListId") is not None:
        perms.append(dict(base, PrefixListIds=[{"PrefixListId": spec[f"{pre}PrefixListId"],
                                                "Description": desc}]))
    gid = spec.get(f"{pre}SecurityGroupId")
    gname = spec.get(f"{pre}SecurityGroupName")
    if gid is not None or gname is not None:
        pair = {"GroupId": gid} if gid is not None else {"GroupName": gname}
        perms.append(dict(base, UserIdGroupPairs=[dict(pair, Description=desc)]))
    if len(perms) == 2 and cidrs == 2:
        warnings.append(f"{where}: CidrIp and CidrIpv6 on one rule (CloudFormation allows "
                        "one peer): taken as two rules")
    elif len(perms) != 1:
        raise ValidationError(where, "CidrIp", "exactly one of CidrIp, CidrIpv6, "
                              f"{pre}PrefixListId, {pre}SecurityGroupId is required")
    return perms


def load(doc: Dict[str, Any], stack_name: str) -> State:
    tpl = _Template(doc, stack_name)
    state = State()
    warnings = state.warnings
    by_name: Dict[str, str] = {}
    inline_egress: Dict[str, bool] = {}
    for logical, res in tpl.resources.items():
        if res["Type"] == SG:
            p = tpl.props(logical)
            gid = tpl.physical[logical]
            name = p.get("GroupName")
            name = f"{stack_name}-{logical}" if name is None else string(name, logical, "GroupName")
            if name in by_name:
                raise ValidationError(logical, "GroupName",
                                      f"{name!r} is already used by {by_name[name]}")
            if p.get("GroupDescription") is None:
                warnings.append(f"{logical}: no GroupDescription (CloudFormation requires one)")
            desc = "" if p.get("GroupDescription") is None else check_aws_text(
                string(p["GroupDescription"], logical, "GroupDescription"), logical,
                "GroupDescription")
            state.groups[gid] = SecurityGroup(gid, name, desc, tags_of(p.get("Tags"), logical))
            by_name[name] = gid
            inline_egress[gid] = bool(p.get("SecurityGroupEgress"))
        elif res["Type"] == PL:
            p = tpl.props(logical)
            plid = tpl.physical[logical]
            fam = parse_family(p.get("AddressFamily"), logical)
            entries = []
            for j, e in enumerate(seq(p.get("Entries"), logical, "Entries")):
                if not isinstance(e, dict):
                    raise ValidationError(logical, f"Entries[{j}]", "must be {Cidr, Description}")
                entries.append(PrefixListEntry(
                    parse_cidr(e.get("Cidr"), logical, f"Entries[{j}].Cidr", strict=True),
                    text_field(e, "Description", logical)))
            if p.get("MaxEntries") is None:
                raise ValidationError(logical, "MaxEntries", "required")
            state.prefix_lists[plid] = PrefixList(
                plid, text_field(p, "PrefixListName", logical, str(logical)),
                fam, parse_int(p["MaxEntries"], logical, "MaxEntries"),
                entries)

    def add(gid: Any, direction: str, spec: Any, where: str) -> None:
        if not isinstance(spec, dict):
            raise ValidationError(where, "Properties", "a rule must be a mapping")
        if not isinstance(gid, str) or gid not in state.groups:
            raise ValidationError(where, "GroupId", f"unknown group {gid!r}")
        for perm in _rule_to_permissions(spec, direction, where, warnings):
            rules: List[Rule] = permission_rules(gid, direction, perm, where, by_name)
            state.groups[gid].rules.extend(rules)

    for logical, res in tpl.resources.items():
        if res["Type"] == SG:
            raw = tpl.resources[logical].get("Properties") or {}
            p = tpl.props(logical)
            gid = tpl.physical[logical]
            for key, direction in (("SecurityGroupIngress", INGRESS),
                                   ("SecurityGroupEgress", EGRESS)):
                for j, spec in enumerate(seq(p.get(key), logical, key)):
                    where = f"{logical}.{key}[{j}]"
                    inline = raw[key][j] if isinstance(raw.get(key), list) else None
                    target = inline.get("Ref") if isinstance(inline, dict) and len(inline) == 1 else None
                    want = SG_IN if direction == INGRESS else SG_OUT
                    if isinstance(target, str) and tpl.resources.get(target, {}).get("Type") == want:
                        warnings.append(f"{where}: a !Ref to the {want} resource {target} "
                                        "(CloudFormation wants a rule here): its rule is taken "
                                        f"once, from {target}")
                        continue
                    add(gid, direction, spec, where)
        elif res["Type"] in (SG_IN, SG_OUT):
            p = tpl.props(logical)
            ref: Any = p.get("GroupId")
            if ref is None and p.get("GroupName") is not None:
                ref = by_name.get(string(p["GroupName"], logical, "GroupName"))
            if ref is None:
                raise ValidationError(logical, "GroupId", "required (a !Ref or !GetAtt X.GroupId)")
            add(ref, INGRESS if res["Type"] == SG_IN else EGRESS, p, logical)
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
                "MacAddress": tags.get(TAG_MAC),
            }
            groups = [check_id("sg", g, logical, f"GroupSet[{i}]")
                      for i, g in enumerate(seq(p.get("GroupSet"), logical, "GroupSet"))]
            eni = interface_from(doc_eni, logical, groups, tags, bool_strings=True)
            track = p.get("ConnectionTrackingSpecification")
            if track is not None:
                eni.timeouts = tracking_timeouts(track, logical)
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
