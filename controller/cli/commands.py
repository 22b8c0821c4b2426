"""The CLI's API subcommands: one per EC2 action, aws-cli-like names and flags.

Each entry names the action and turns the parsed flags into its parameters;
``--cli-input-json`` passes raw parameters instead, as aws-cli does.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from controller.policy.vocabulary import TAG_ADDRESSES, TAG_DEVICE, TAG_MODE, TAG_REVALIDATE

Params = Dict[str, Any]


def _kv_tags(items: Optional[List[str]]) -> List[Dict[str, str]]:
    out = []
    for item in items or []:
        key, _, val = item.partition("=")
        out.append({"Key": key, "Value": val})
    return out


def _ports(args: argparse.Namespace) -> Params:
    if args.icmp_type is not None or args.icmp_code is not None:
        return {"FromPort": -1 if args.icmp_type is None else args.icmp_type,
                "ToPort": -1 if args.icmp_code is None else args.icmp_code}
    if args.port is None:
        return {}
    lo, _, hi = str(args.port).partition("-")
    return {"FromPort": int(lo), "ToPort": int(hi or lo)}


def permission(args: argparse.Namespace) -> Params:
    """--protocol/--port/--cidr/--source-group/--prefix-list-id -> one IpPermission."""
    if args.ip_permissions:
        return {"IpPermissions": json.loads(args.ip_permissions)}
    perm: Params = {"IpProtocol": args.protocol, **_ports(args)}
    desc = {"Description": args.description} if args.description else {}
    for cidr in args.cidr or []:
        key, sub = ("Ipv6Ranges", "CidrIpv6") if ":" in cidr else ("IpRanges", "CidrIp")
        perm.setdefault(key, []).append({sub: cidr, **desc})
    for gid in args.source_group or []:
        perm.setdefault("UserIdGroupPairs", []).append({"GroupId": gid, **desc})
    for pl in args.prefix_list_id or []:
        perm.setdefault("PrefixListIds", []).append({"PrefixListId": pl, **desc})
    return {"IpPermissions": [perm]}


def _group(args: argparse.Namespace) -> Params:
    return {"GroupId": args.group_id} if args.group_id else {"GroupName": args.group_name}


def _rule_flags(p: argparse.ArgumentParser, revoke: bool = False) -> None:
    p.add_argument("--group-id")
    p.add_argument("--group-name")
    p.add_argument("--protocol", default="tcp", help="tcp, udp, icmp, icmpv6, -1 or a number")
    p.add_argument("--port", help="80 or 1000-2000 (tcp/udp)")
    p.add_argument("--icmp-type", type=int)
    p.add_argument("--icmp-code", type=int)
    p.add_argument("--cidr", action="append", help="IPv4 or IPv6 CIDR (repeatable)")
    p.add_argument("--source-group", action="append", help="sg- id of the peer group")
    p.add_argument("--prefix-list-id", action="append")
    p.add_argument("--description")
    p.add_argument("--ip-permissions", help="IpPermissions as JSON")
    if revoke:
        p.add_argument("--security-group-rule-ids", nargs="+")


def _revoke(args: argparse.Namespace) -> Params:
    if args.security_group_rule_ids:
        return {**_group(args), "SecurityGroupRuleIds": args.security_group_rule_ids}
    return {**_group(args), **permission(args)}


def _modify_rule(args: argparse.Namespace) -> Params:
    rule: Params = {"IpProtocol": args.protocol, **_ports(args)}
    if args.cidr:
        rule["CidrIpv6" if ":" in args.cidr[0] else "CidrIpv4"] = args.cidr[0]
    if args.source_group:
        rule["ReferencedGroupId"] = args.source_group[0]
    if args.prefix_list_id:
        rule["PrefixListId"] = args.prefix_list_id[0]
    if args.description:
        rule["Description"] = args.description
    return {"GroupId": args.group_id,
            "SecurityGroupRules": [{"SecurityGroupRuleId": args.security_group_rule_id,
                                    "SecurityGroupRule": rule}]}


def _entries(items: Optional[List[str]]) -> List[Params]:
    out = []
    for item in items or []:
        cidr, _, desc = item.partition(",")
        out.append({"Cidr": cidr, **({"Description": desc} if desc else {})})
    return out


def _timeouts(args: argparse.Namespace) -> Optional[Params]:
    spec = {k: v for k, v in (("TcpEstablishedTimeout", args.tcp_established_timeout),
                              ("UdpStreamTimeout", args.udp_stream_timeout),
                              ("UdpTimeout", args.udp_timeout)) if v is not None}
    return spec or None


def _timeout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tcp-established-timeout", type=int)
    p.add_argument("--udp-stream-timeout", type=int)
    p.add_argument("--udp-timeout", type=int)


def _create_eni(args: argparse.Namespace) -> Params:
    tags = _kv_tags(args.tag)
    if args.device:
        tags += [{"Key": TAG_DEVICE, "Value": args.device},
                 {"Key": TAG_MODE, "Value": args.mode}]
    if args.watch_addresses:
        tags.append({"Key": TAG_ADDRESSES, "Value": "watch"})
    if args.revalidate:
        tags.append({"Key": TAG_REVALIDATE, "Value": "true"})
    p: Params = {"Groups": args.groups or [], "Description": args.description,
                 "SourceDestCheck": args.source_dest_check, "MacAddress": args.mac_address,
                 "PrivateIpAddresses": [{"PrivateIpAddress": a} for a in args.private_ip or []],
                 "Ipv6Addresses": [{"Ipv6Address": a} for a in args.ipv6 or []],
                 "TagSpecifications": [{"ResourceType": "network-interface", "Tags": tags}]}
    if _timeouts(args):
        p["ConnectionTrackingSpecification"] = _timeouts(args)
    if args.node:
        p["Node"] = args.node
    return p


def _modify_eni(args: argparse.Namespace) -> Params:
    p: Params = {"NetworkInterfaceId": args.network_interface_id}
    if args.groups:
        p["Groups"] = args.groups
    if _timeouts(args):
        p["ConnectionTrackingSpecification"] = _timeouts(args)
    if args.description is not None:
        p["Description"] = {"Value": args.description}
    if args.source_dest_check is not None:
        p["SourceDestCheck"] = {"Value": args.source_dest_check}
    return p


def _source_dest_check_flag(p: argparse.ArgumentParser, default: Optional[bool]) -> None:
    p.add_argument("--source-dest-check", dest="source_dest_check", action="store_true",
                   default=default, help="only the interface's own addresses, in and out "
                   "(AWS SourceDestCheck; the default)")
    p.add_argument("--no-source-dest-check", dest="source_dest_check", action="store_false",
                   help="no address checks: a NAT or router instance")


def _eni_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network-interface-id", required=True)


Spec = Tuple[str, str, str, Callable[[argparse.ArgumentParser], None],
             Callable[[argparse.Namespace], Params]]


def _create_sg_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-name", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--tag", action="append", help="KEY=VALUE")


def _group_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-id")
    p.add_argument("--group-name")


def _describe_sg_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-ids", nargs="+")
    p.add_argument("--group-names", nargs="+")


def _describe_rules_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-id")
    p.add_argument("--security-group-rule-ids", nargs="+")


def _describe_rules(a: argparse.Namespace) -> Params:
    p: Params = {}
    if a.security_group_rule_ids:
        p["SecurityGroupRuleIds"] = a.security_group_rule_ids
    if a.group_id:
        p["Filters"] = [{"Name": "group-id", "Values": [a.group_id]}]
    return p


def _modify_rule_flags(p: argparse.ArgumentParser) -> None:
    _rule_flags(p)
    p.add_argument("--security-group-rule-id", required=True)


def _create_pl_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-list-name", required=True)
    p.add_argument("--address-family", default="IPv4", choices=("IPv4", "IPv6"))
    p.add_argument("--max-entries", type=int, required=True)
    p.add_argument("--entry", action="append", help="CIDR[,description] (repeatable)")


def _modify_pl_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-list-id", required=True)
    p.add_argument("--current-version", type=int)
    p.add_argument("--add-entry", action="append", help="CIDR[,description]")
    p.add_argument("--remove-entry", action="append", help="CIDR")
    p.add_argument("--max-entries", type=int)


def _modify_pl(a: argparse.Namespace) -> Params:
    p: Params = {"PrefixListId": a.prefix_list_id, "AddEntries": _entries(a.add_entry),
                 "RemoveEntries": [{"Cidr": c} for c in a.remove_entry or []]}
    if a.current_version is not None:
        p["CurrentVersion"] = a.current_version
    if a.max_entries is not None:
        p["MaxEntries"] = a.max_entries
    return p


def _pl_id_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-list-id", required=True)


def _describe_pl_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-list-ids", nargs="+")


def _create_eni_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", nargs="+")
    p.add_argument("--private-ip", action="append")
    p.add_argument("--ipv6", action="append")
    p.add_argument("--device", help="the local device this interface is (host-interface tag)")
    p.add_argument("--mode", choices=("workload", "host"), default="workload")
    p.add_argument("--watch-addresses", action="store_true",
                   help="take the addresses from the device and follow them")
    p.add_argument("--revalidate", action="store_true",
                   help="a policy change cuts the tracked connections it no longer allows")
    p.add_argument("--mac-address", help="the instance's MAC (gives its IPv6 link-local)")
    p.add_argument("--node", help="the host whose agent binds it (fleet; default: the agent's)")
    _source_dest_check_flag(p, True)
    p.add_argument("--description")
    p.add_argument("--tag", action="append", help="KEY=VALUE")
    _timeout_flags(p)


def _modify_eni_flags(p: argparse.ArgumentParser) -> None:
    _eni_flags(p)
    p.add_argument("--groups", nargs="+")
    p.add_argument("--description")
    _source_dest_check_flag(p, None)
    _timeout_flags(p)


def _describe_eni_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--network-interface-ids", nargs="+")


def _addresses_flags(p: argparse.ArgumentParser) -> None:
    _eni_flags(p)
    p.add_argument("--private-ip", action="append")
    p.add_argument("--ipv6", action="append")


def _addresses(a: argparse.Namespace) -> Params:
    return {"NetworkInterfaceId": a.network_interface_id,
            "PrivateIpAddresses": a.private_ip or [], "Ipv6Addresses": a.ipv6 or []}


# (subcommand, action, help, add flags, flags -> parameters)
COMMANDS: List[Spec] = [
    ("create-security-group", "CreateSecurityGroup", "create a group (default egress rules)",
     _create_sg_flags, lambda a: {"GroupName": a.group_name, "Description": a.description,
                                  "TagSpecifications": [{"ResourceType": "security-group",
                                                         "Tags": _kv_tags(a.tag)}]}),
    ("delete-security-group", "DeleteSecurityGroup", "delete an unused group",
     _group_flags, _group),
    ("authorize-ingress", "AuthorizeSecurityGroupIngress", "add ingress rules",
     _rule_flags, lambda a: {**_group(a), **permission(a)}),
    ("authorize-egress", "AuthorizeSecurityGroupEgress", "add egress rules",
     _rule_flags, lambda a: {**_group(a), **permission(a)}),
    ("revoke-ingress", "RevokeSecurityGroupIngress", "remove ingress rules",
     lambda p: _rule_flags(p, revoke=True), _revoke),
    ("revoke-egress", "RevokeSecurityGroupEgress", "remove egress rules",
     lambda p: _rule_flags(p, revoke=True), _revoke),
    ("modify-security-group-rules", "ModifySecurityGroupRules", "change one rule in place",
     _modify_rule_flags, _modify_rule),
    ("describe-security-groups", "DescribeSecurityGroups", "list groups with their rules",
     _describe_sg_flags, lambda a: {k: v for k, v in (("GroupIds", a.group_ids),
                                                      ("GroupNames", a.group_names)) if v}),
    ("describe-security-group-rules", "DescribeSecurityGroupRules", "list rules with their ids",
     _describe_rules_flags, _describe_rules),
    ("create-managed-prefix-list", "CreateManagedPrefixList", "create a prefix list",
     _create_pl_flags, lambda a: {"PrefixListName": a.prefix_list_name,
                                  "AddressFamily": a.address_family,
                                  "MaxEntries": a.max_entries, "Entries": _entries(a.entry)}),
    ("modify-managed-prefix-list", "ModifyManagedPrefixList", "add/remove entries",
     _modify_pl_flags, _modify_pl),
    ("delete-managed-prefix-list", "DeleteManagedPrefixList", "delete an unused prefix list",
     _pl_id_flags, lambda a: {"PrefixListId": a.prefix_list_id}),
    ("describe-managed-prefix-lists", "DescribeManagedPrefixLists", "list prefix lists",
     _describe_pl_flags, lambda a: {"PrefixListIds": a.prefix_list_ids} if a.prefix_list_ids
     else {}),
    ("get-managed-prefix-list-entries", "GetManagedPrefixListEntries", "entries of a list",
     _pl_id_flags, lambda a: {"PrefixListId": a.prefix_list_id}),
    ("create-network-interface", "CreateNetworkInterface", "add an interface (member)",
     _create_eni_flags, _create_eni),
    ("modify-network-interface-attribute", "ModifyNetworkInterfaceAttribute",
     "change an interface's groups, timeouts, description or source/dest check",
     _modify_eni_flags, _modify_eni),
    ("delete-network-interface", "DeleteNetworkInterface", "remove an interface",
     _eni_flags, lambda a: {"NetworkInterfaceId": a.network_interface_id}),
    ("describe-network-interfaces", "DescribeNetworkInterfaces", "list interfaces",
     _describe_eni_flags, lambda a: {"NetworkInterfaceIds": a.network_interface_ids}
     if a.network_interface_ids else {}),
    ("assign-private-ip-addresses", "AssignPrivateIpAddresses", "add addresses to an interface",
     _addresses_flags, _addresses),
    ("unassign-private-ip-addresses", "UnassignPrivateIpAddresses",
     "remove addresses from an interface", _addresses_flags, _addresses),
]


def add_commands(sub: Any, run: Callable[[argparse.Namespace], int]) -> None:
    for name, action, help_text, flags, build in COMMANDS:
        p = sub.add_parser(name, help=f"{help_text} ({action})")
        flags(p)
        p.add_argument("--cli-input-json", help="the action's parameters as JSON")
        p.add_argument("--output", "-o", choices=("table", "json"), default="table")
        p.set_defaults(fn=run, action=action, build=build)


def params_of(args: argparse.Namespace) -> Params:
    if args.cli_input_json:
        out = json.loads(args.cli_input_json)
        if not isinstance(out, dict):
            raise ValueError("--cli-input-json must be a JSON object")
        return out
    return dict(args.build(args))


def print_table(result: Params) -> None:
    """Lists of objects as columns of their scalar fields; the rest as key: value."""
    for key, val in result.items():
        if isinstance(val, list) and val and all(isinstance(v, dict) for v in val):
            cols = [c for c in val[0] if not isinstance(val[0][c], list)]
            widths = {c: max(len(c), *(len(_cell(v.get(c))) for v in val)) for c in cols}
            print(key)
            print("  " + "  ".join(c.upper().ljust(widths[c]) for c in cols))
            for v in val:
                print("  " + "  ".join(_cell(v.get(c)).ljust(widths[c]) for c in cols))
                for sub, inner in v.items():
                    if isinstance(inner, list) and inner:
                        print(f"    {sub}: " + "; ".join(_cell(i) for i in inner))
        elif isinstance(val, list):
            print(f"{key}: {', '.join(_cell(v) for v in val) or '-'}")
        else:
            print(f"{key}: {_cell(val)}")


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        return " ".join(f"{k}={_cell(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ",".join(_cell(x) for x in v)
    return "-" if v is None else str(v)
