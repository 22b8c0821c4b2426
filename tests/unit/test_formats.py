"""Model and formats: every format, the seed template, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.policy.errors import ValidationError
from controller.policy.formats import load_document, load_file, load_text
from controller.policy.formats.native import dump
from controller.policy.model import EGRESS, INGRESS, Peer

ROOT = Path(__file__).resolve().parents[2]


def rules_of(state, gid, direction=None):
    return [(r.protocol, r.from_port, r.to_port, str(r.peer))
            for r in state.groups[gid].rules if direction in (None, r.direction)]


def test_seed_cloudformation_template_loads() -> None:
    s = load_file(str(ROOT / "examples" / "web-stack.yaml"))
    gid = "sg-webserversecuritygroup"
    assert s.groups[gid].name == "web-stack-web"  # !Sub with AWS::StackName = file stem
    assert sorted(rules_of(s, gid, INGRESS)) == sorted([
        (6, 80, 80, "0.0.0.0/0"), (6, 80, 80, "::/0"), (6, 443, 443, "0.0.0.0/0"),
        (6, 443, 443, "::/0")])
    # no SecurityGroupEgress property: the default egress (IPv6 in use -> also ::/0)
    assert sorted(rules_of(s, gid, EGRESS)) == [(-1, -1, -1, "0.0.0.0/0"), (-1, -1, -1, "::/0")]
    eni = s.interfaces["eni-webinterface"]
    assert eni.device == "sgdemo-web" and eni.mode == "workload" and eni.groups == [gid]
    assert [str(a) for a in eni.addresses()] == ["198.18.0.10", "2001:db8::10"]


def test_aws_json_example() -> None:
    s = load_file(str(ROOT / "examples" / "aws.json"))
    app = "sg-0a1b2c3d4e5f60001"
    assert (6, 8000, 8099, "sg-0a1b2c3d4e5f60002") in rules_of(s, app, INGRESS)
    assert (1, 8, -1, "pl-0a1b2c3d4e5f60003") in rules_of(s, app, INGRESS)
    eni = s.interfaces["eni-0a1b2c3d4e5f60011"]
    assert eni.timeouts.tcp_established == 3600 and eni.timeouts.udp_stream == 120
    assert s.interfaces["eni-0a1b2c3d4e5f60012"].device is None  # remote member
    assert s.prefix_lists["pl-0a1b2c3d4e5f60003"].version == 3
    # an IpPermission with two peers becomes two rules
    assert len(rules_of(s, "sg-0a1b2c3d4e5f60002", INGRESS)) == 2


def test_security_group_rules_shape() -> None:
    s = load_document({"SecurityGroupRules": [
        {"SecurityGroupRuleId": "sgr-01", "GroupId": "sg-1", "IsEgress": False,
         "IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "CidrIpv4": "10.1.2.3/16"},
        {"SecurityGroupRuleId": "sgr-02", "GroupId": "sg-1", "IsEgress": True,
         "IpProtocol": "-1", "FromPort": -1, "ToPort": -1,
         "ReferencedGroupInfo": {"GroupId": "sg-1"}}]})
    assert rules_of(s, "sg-1") == [(17, 53, 53, "10.1.0.0/16"), (-1, -1, -1, "sg-1")]
    assert [r.rule_id for r in s.groups["sg-1"].rules] == ["sgr-01", "sgr-02"]


def test_native_example_and_round_trip() -> None:
    s = load_file(str(ROOT / "examples" / "native.yaml"))
    assert s.interfaces["eni-remote"].device is None
    again = load_document(dump(s))
    assert {g: rules_of(again, g) for g in again.groups} == {g: rules_of(s, g) for g in s.groups}


def test_names_and_numbers_are_the_same_protocol() -> None:
    a = load_document({"sgctl": 1, "groups": {"sg-a": {"ingress": [
        {"proto": "tcp", "ports": 80, "from": "0.0.0.0/0"}]}}})
    b = load_document({"sgctl": 1, "groups": {"sg-a": {"ingress": [
        {"proto": 6, "ports": 80, "from": "0.0.0.0/0"}]}}})
    assert a.groups["sg-a"].rules[0].rule_id == b.groups["sg-a"].rules[0].rule_id


def test_default_group_is_added() -> None:
    s = load_document({"sgctl": 1, "interfaces": {"eni-1": {"ipv4": ["198.18.0.1"]}}})
    assert s.interfaces["eni-1"].groups == ["sg-default"]
    assert rules_of(s, "sg-default", INGRESS) == [(-1, -1, -1, "sg-default")]
    assert s.groups["sg-default"].rules[0].peer == Peer("sg", "sg-default")


def test_stale_reference_is_reported_not_an_error() -> None:
    s = load_document({"sgctl": 1, "groups": {"sg-a": {"ingress": [
        {"proto": "tcp", "ports": 1, "from": "sg-gone"}]}}})
    assert [r.peer.value for r in s.stale_rules] == ["sg-gone"]


def test_source_dest_check_in_every_format() -> None:
    """Native ``source_dest_check``/``mac_address``, AWS ``SourceDestCheck``/
    ``MacAddress``, CloudFormation ``SourceDestCheck`` and the tag
    ``host-interface-mac``; on by default; a forced wide exemption loads."""
    native = load_document({"sgctl": 1, "interfaces": {
        "eni-1": {"mac_address": "02:AA:BB:00:00:01"}, "eni-2": {"source_dest_check": False}},
        "settings": {"exempt": ["10.0.0.0/7"], "exempt_force": True,
                     "dhcp_servers": ["198.18.0.1"]}})
    one, two = native.interfaces["eni-1"], native.interfaces["eni-2"]
    assert one.source_dest_check and not two.source_dest_check
    assert str(one.link_local()) == "fe80::aa:bbff:fe00:1"
    assert [str(n) for n in native.settings.dhcp_servers] == ["198.18.0.1/32"]
    again = load_document(dump(native))
    assert again.interfaces["eni-2"].source_dest_check is False
    assert again.interfaces["eni-1"].mac_address == "02:aa:bb:00:00:01"
    aws = load_document({"NetworkInterfaces": [
        {"NetworkInterfaceId": "eni-1", "SourceDestCheck": False, "MacAddress": "02:00:00:00:00:05"},
        {"NetworkInterfaceId": "eni-2"}]})
    assert not aws.interfaces["eni-1"].source_dest_check
    assert aws.interfaces["eni-2"].source_dest_check
    cfn = load_document({"Resources": {"Eni": {"Type": "AWS::EC2::NetworkInterface", "Properties": {
        "SourceDestCheck": False, "Tags": [{"Key": "host-interface-mac",
                                            "Value": "02:00:00:00:00:07"}]}}}})
    (eni,) = cfn.interfaces.values()
    assert not eni.source_dest_check and eni.mac_address == "02:00:00:00:00:07"


@pytest.mark.parametrize("doc, where, field, words", [
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": "tcp", "ports": "80-70000",
                                                   "from": "0.0.0.0/0"}]}}},
     "sg-a ingress[0]", "ToPort", "70000"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": "tcp", "ports": 80,
                                                   "from": "10.0.0.300/8"}]}}},
     "sg-a ingress[0]", "from", "bad CIDR"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": "icmp", "type": -1, "code": 3,
                                                   "from": "0.0.0.0/0"}]}}},
     "sg-a ingress[0]", "ToPort", "without a type"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": "tcpx", "ports": 1,
                                                   "from": "0.0.0.0/0"}]}}},
     "sg-a ingress[0]", "IpProtocol", "unknown protocol"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": 300, "from": "0.0.0.0/0"}]}}},
     "sg-a ingress[0]", "IpProtocol", "outside 0-255"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [
        {"proto": "tcp", "ports": 80, "from": "10.1.2.3/16"},
        {"proto": 6, "ports": "80-80", "from": "10.1.0.0/16"}]}}},
     "sg-a ingress[1]", "IpPermissions", "duplicate rule"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"groups": ["sg-nope"]}}},
     "eni-1", "Groups", "unknown group sg-nope"),
    ({"sgctl": 1, "groups": {f"sg-{i}": {} for i in range(17)},
      "interfaces": {"eni-1": {"groups": [f"sg-{i}" for i in range(17)]}}},
     "eni-1", "Groups", "at most 16"),
    ({"sgctl": 1, "groups": {"sg-a": {"ingress": [{"proto": "tcp", "ports": 1,
                                                   "from": "pl-nope"}]}}},
     "sg-a ingress[0]", "PrefixListId", "unknown prefix list"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"timeouts": {"udp_stream": 500}}}},
     "eni-1", "udp_stream", "60-180"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 1, "ToPort": 2}]}]},
     "sg-1 IpPermissions[0]", "IpPermissions", "no peer"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "udp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}]},
     "sg-1 IpPermissions[0]", "FromPort", "required for protocol udp"),
    ({"Resources": {"R": {"Type": "AWS::EC2::SecurityGroupIngress", "Properties": {
        "GroupId": {"Ref": "Missing"}, "IpProtocol": "tcp", "FromPort": 1, "ToPort": 1,
        "CidrIp": "0.0.0.0/0"}}}},
     "R", "Ref", "unknown resource"),
    ({"groups": {"sg-a": {"ingress": [{"proto": "tcp", "ports": 1, "from": "1.2.3.4/32",
                                       "color": "red"}]}}},
     "sg-a ingress[0]", "color", "unknown field"),
    ({"sgctl": 1, "settings": {"exempt": ["169.254.169.254/32", "0.0.0.0/0"]}},
     "settings exempt[1]", "exempt", "exempt_force"),
    ({"sgctl": 1, "settings": {"exempt": ["2000::/3"]}},
     "settings exempt[0]", "exempt", "/32 or longer"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"source_dest_check": "no"}}},
     "eni-1", "source_dest_check", "not true or false"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"mac_address": "02:00:00:00:00"}}},
     "eni-1", "mac_address", "not a MAC address"),
    ({"NetworkInterfaces": [{"NetworkInterfaceId": "eni-1", "SourceDestCheck": 1}]},
     "eni-1", "SourceDestCheck", "not true or false"),
    # strict booleans: the string "false" is not false (it used to become true)
    ({"sgctl": 1, "settings": {"exempt_dhcp": "false"}}, "settings", "exempt_dhcp", "true or false"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"revalidate": "false"}}},
     "eni-1", "revalidate", "true or false"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"watch_addresses": "false"}}},
     "eni-1", "watch_addresses", "true or false"),
    ({"SecurityGroupRules": [{"GroupId": "sg-1", "IsEgress": "false", "IpProtocol": "-1",
                              "CidrIpv4": "198.18.0.0/15"}]},
     "SecurityGroupRules[0]", "IsEgress", "true or false"),
    # whole-string names: a trailing newline is not a device name
    ({"sgctl": 1, "interfaces": {"eni-1": {"device": "veth0\n"}}},
     "eni-1", "host-interface", "not a device name"),
    ({"sgctl": 1, "interfaces": {"eni-1\n": {}}}, "eni-1\n", "id", "not a valid eni- id"),
    # nodes: a host name, and a device is bound once per node
    ({"sgctl": 1, "interfaces": {"eni-1": {"node": "host 2"}}}, "eni-1", "host-node",
     "not a node name"),
    ({"sgctl": 1, "interfaces": {"eni-1": {"device": "veth0", "node": "h1"},
                                 "eni-2": {"device": "veth0", "node": "h1"}}},
     "eni-2", "host-interface", "already bound to eni-1"),
    # the default group's id belongs to the default group
    ({"sgctl": 1, "groups": {"sg-default": {"name": "web"}}},
     "sg-default", "GroupId", "needs another id"),
    # CloudFormation: logical ids that give one physical id
    ({"Resources": {"WebSG": {"Type": "AWS::EC2::SecurityGroup",
                              "Properties": {"GroupDescription": "a"}},
                    "websg": {"Type": "AWS::EC2::SecurityGroup",
                              "Properties": {"GroupDescription": "b"}}}},
     "websg", "(logical id)", "sg-websg"),
    # what used to escape as tracebacks
    ({"PrefixLists": [{"PrefixListId": "pl-a", "AddressFamily": "IPv4", "Version": "x",
                       "Entries": []}]}, "pl-a", "Version", "not an integer"),
    ({"Resources": {"G": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
        "GroupDescription": "d", "GroupName": {"Fn::Join": [","]}}}}},
     "G", "Fn::Join", "delimiter"),
    ({"Resources": {"G": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
        "GroupDescription": "d", "GroupName": {"Fn::Select": [3, ["a"]]}}}}},
     "G", "Fn::Select", "not in the list"),
    ({"Resources": {"G": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
        "GroupDescription": "d", "GroupName": {"Fn::GetAtt": "G.GroupName"}}}}},
     "G", "Fn::GetAtt", "depends on itself"),
    ({"Parameters": ["x"], "Resources": {}}, "template", "Parameters", "mapping"),
    ({"Resources": {"G": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
        "GroupDescription": "d", "GroupName": ["a"]}}}}, "G", "GroupName", "not a string"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "GroupName": ["a"]}]},
     "sg-1", "GroupName", "not a string"),
    # EC2's own answers in the AWS formats
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}]},
     "sg-1 IpPermissions[0]", "FromPort", "outside 0-65535"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "icmp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}]},
     "sg-1 IpPermissions[0]", "FromPort", "ICMP type and code"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "198.18.0.1"}]}]}]},
     "sg-1 IpPermissions[0]", "IpRanges[0].CidrIp", "no prefix length"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "fe80::1%eth0/64"}]}]}]},
     "sg-1 IpPermissions[0]", "Ipv6Ranges[0].CidrIpv6", "zone index"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "caf\u00e9 <b>"}]}]}]},
     "sg-1 IpPermissions[0]", "Description", "characters EC2 does not accept"),
    ({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}, {"CidrIp": "0.0.0.0/0"}]}]}]},
     "sg-1 ingress[1]", "IpPermissions", "duplicate rule"),
])
def test_errors_name_object_and_field(doc, where, field, words) -> None:
    with pytest.raises(ValidationError) as info:
        load_document(doc)
    err = info.value
    assert (err.obj, err.fieldname) == (where, field), str(err)
    assert words in err.message, str(err)


def test_syntax_errors_are_validation_errors() -> None:
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_text("groups: [unclosed")
    with pytest.raises(ValidationError, match="not a CloudFormation template"):
        load_text(json.dumps({"foo": 1}))


def test_duplicate_rule_is_ec2s_duplicate_error() -> None:
    with pytest.raises(ValidationError) as info:
        load_document({"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
            {"IpProtocol": "all", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}]})
    assert info.value.code == "InvalidPermission.Duplicate"


def test_native_stays_lenient_where_documented() -> None:
    s = load_document({"sgctl": 1, "groups": {"sg-a": {"ingress": [
        {"proto": "tcp", "ports": -1, "from": "198.18.0.1", "description": "caf\u00e9"}]}}})
    assert rules_of(s, "sg-a", INGRESS) == [(6, 0, 65535, "198.18.0.1/32")]


def test_cloudformation_empty_egress_is_the_default_egress() -> None:
    s = load_document({"Resources": {"G": {"Type": "AWS::EC2::SecurityGroup", "Properties": {
        "GroupDescription": "d", "SecurityGroupEgress": []}}}})
    assert rules_of(s, "sg-g", EGRESS) == [(-1, -1, -1, "0.0.0.0/0")]


def test_article_seed_template_loads_with_warnings() -> None:
    s = load_file(str(ROOT / "tests" / "data" / "seed-template.yaml"))
    gid = "sg-ec2securitygroup"
    assert s.groups[gid].name == "seed-template-sg"
    assert sorted(rules_of(s, gid, INGRESS)) == [
        (6, 80, 80, "0.0.0.0/0"), (6, 80, 80, "::/0"), (6, 443, 443, "0.0.0.0/0"),
        (6, 443, 443, "::/0")]
    assert s.interfaces["eni-webinterface"].device == "sgseed-web"
    text = "\n".join(s.warnings)
    for words in ("EC2SecurityGroup.SecurityGroupIngress[0]: a !Ref to the "
                  "AWS::EC2::SecurityGroupIngress resource EC2SecurityGroupIngressHttp",
                  "SecurityGroupIngress[1]", "EC2SecurityGroupIngressHttp: CidrIp and CidrIpv6",
                  "EC2SecurityGroupIngressHttps: CidrIp and CidrIpv6",
                  "EC2SecurityGroup: no GroupDescription"):
        assert words in text, text
    assert len(s.warnings) == 5


@pytest.mark.parametrize("text, words", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "aliases"),
    ("base: &b {proto: tcp}\ngroups:\n  sg-a:\n    ingress: [{<<: *b, ports: 1, from: 1.2.3.4/32}]\n",
     "merge keys"),
    ("sgctl: 1\ninterfaces:\n  eni-1: {device: a}\ninterfaces:\n  eni-2: {}\n",
     "duplicate key 'interfaces'"),
    ('{"sgctl": 1, "groups": {"sg-a": {}, "sg-a": {"name": "x"}}}', "duplicate key 'sg-a'"),
    ("[" * 70 + "]" * 70, "nested deeper than 64"),
    ("x: " + "[" * 70 + "]" * 70, "nested deeper than 64"),
    ('{"sgctl": 1, "settings": {"max_groups_per_interface": ' + "9" * 5000 + "}}",
     "cannot be read"),
    ("sgctl: 1\nsettings: {max_groups_per_interface: " + "9" * 5000 + "}\n", "cannot be read"),
])
def test_hostile_text_is_refused_before_it_is_built(text, words) -> None:
    with pytest.raises(ValidationError, match=words):
        load_text(text)


def test_document_size_is_bounded() -> None:
    from controller.policy.formats.text import MAX_DOCUMENT_BYTES

    with pytest.raises(ValidationError, match="at most"):
        load_text("#" * (MAX_DOCUMENT_BYTES + 1))


def test_libyaml_loader_is_used() -> None:
    import yaml

    from controller.policy.formats import text

    assert text.WITH_LIBYAML == yaml.__with_libyaml__


def test_one_device_name_on_two_nodes() -> None:
    """veth0 on host 1 and veth0 on host 2 are two devices."""
    state = load_document({"sgctl": 1, "interfaces": {
        "eni-1": {"device": "veth0", "node": "h1"}, "eni-2": {"device": "veth0", "node": "h2"}}})
    assert {e.node for e in state.interfaces.values()} == {"h1", "h2"}

