"""The EC2 endpoint with the real clients: boto3 and the AWS CLI against a
`sgctl daemon --ec2-endpoint`, signed with keys from a credentials file."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from typing import Any, Dict, Iterator, List, Set
from urllib.parse import urlencode

import botocore
import pytest
from botocore.exceptions import ClientError

from controller.service.ec2.server import SERVED
from controller.tools.topology import Topology
from tests.daemonproc import DaemonProc, Ec2Daemon, free_port
from tests.harness import unique

pytestmark = pytest.mark.netns

@pytest.fixture(scope="module")
def ec2() -> Iterator[Ec2Daemon]:
    """One daemon for the module's tests (each works on objects of its own)."""
    d = DaemonProc()
    try:
        e = Ec2Daemon(d, False, "--metrics-address", f"127.0.0.1:{free_port()}")
        yield e
    finally:
        d.close()


def code_of(fn: Any, **kw: Any) -> str:
    with pytest.raises(ClientError) as exc:
        fn(**kw)
    return str(exc.value.response["Error"]["Code"])


class Recorder:
    """A boto3 client that remembers which operations it called."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.called: Set[str] = set()
        client.meta.events.register("before-call.ec2.*", self._seen)

    def _seen(self, model: Any, **_: Any) -> None:
        self.called.add(model.name)


def test_every_action_through_boto3(ec2: Ec2Daemon) -> None:
    rec = Recorder(ec2.client())
    c = rec.client
    gid = c.create_security_group(GroupName=unique("web"), Description="web", TagSpecifications=[
        {"ResourceType": "security-group", "Tags": [{"Key": "team", "Value": "a"}]}])["GroupId"]
    peer = c.create_security_group(GroupName=unique("peer"), Description="peers")["GroupId"]
    pl = c.create_managed_prefix_list(PrefixListName="office", MaxEntries=5, AddressFamily="IPv4",
                                      Entries=[{"Cidr": "198.18.4.0/24", "Description": "a"}],
                                      TagSpecifications=[{"ResourceType": "prefix-list", "Tags": [
                                          {"Key": "site", "Value": "hq"}]}])["PrefixList"]
    assert pl["PrefixListName"] == "office" and pl["MaxEntries"] == 5
    assert pl["Tags"] == [{"Key": "site", "Value": "hq"}]
    plid = pl["PrefixListId"]
    c.modify_managed_prefix_list(PrefixListId=plid, CurrentVersion=pl["Version"],
                                 AddEntries=[{"Cidr": "198.18.5.0/24"}])
    entries = c.get_managed_prefix_list_entries(PrefixListId=plid)["Entries"]
    assert sorted(e["Cidr"] for e in entries) == ["198.18.4.0/24", "198.18.5.0/24"]
    assert [p["PrefixListId"] for p in c.describe_managed_prefix_lists(
        PrefixListIds=[plid])["PrefixLists"]] == [plid]
    added = c.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "IpRanges": [{"CidrIp": "198.18.0.0/24", "Description": "lan"}],
         "UserIdGroupPairs": [{"GroupId": peer}], "PrefixListIds": [{"PrefixListId": plid}]}]
        )["SecurityGroupRules"]
    assert len(added) == 3 and {r["IsEgress"] for r in added} == {False}
    egress = c.authorize_security_group_egress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53,
         "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/64"}]}], TagSpecifications=[
        {"ResourceType": "security-group-rule", "Tags": [{"Key": "why", "Value": "dns"}]}]
        )["SecurityGroupRules"]
    assert egress[0]["CidrIpv6"] == "2001:db8::/64" and egress[0]["IsEgress"]
    assert egress[0]["Tags"] == [{"Key": "why", "Value": "dns"}]
    g = c.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
    assert g["Tags"] == [{"Key": "team", "Value": "a"}]
    perm = g["IpPermissions"][0]
    assert (perm["FromPort"], perm["IpRanges"][0]["Description"]) == (80, "lan")
    assert perm["UserIdGroupPairs"][0]["GroupId"] == peer
    rules = c.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [gid]}]
                                            )["SecurityGroupRules"]
    lan = next(r for r in rules if r.get("CidrIpv4") == "198.18.0.0/24")
    c.modify_security_group_rules(GroupId=gid, SecurityGroupRules=[{
        "SecurityGroupRuleId": lan["SecurityGroupRuleId"], "SecurityGroupRule": {
            "IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "CidrIpv4": "198.18.0.0/24"}}])
    changed = c.describe_security_group_rules(SecurityGroupRuleIds=[lan["SecurityGroupRuleId"]]
                                              )["SecurityGroupRules"][0]
    assert changed["FromPort"] == 8080
    c.revoke_security_group_ingress(GroupId=gid, SecurityGroupRuleIds=[lan["SecurityGroupRuleId"]])
    c.revoke_security_group_egress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53,
         "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/64"}]}])
    left = c.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [gid]}]
                                           )["SecurityGroupRules"]
    assert len(left) == 3  # two ingress peers and the default egress

    eni = c.create_network_interface(SubnetId="subnet-local", Groups=[gid],
                                     PrivateIpAddress="198.18.0.90", Description="first",
                                     TagSpecifications=[{"ResourceType": "network-interface",
                                                         "Tags": [{"Key": "k", "Value": "v"}]}],
                                     )["NetworkInterface"]
    eid = eni["NetworkInterfaceId"]
    assert eni["PrivateIpAddress"] == "198.18.0.90" and eni["Groups"] == [{"GroupId": gid}]
    c.modify_network_interface_attribute(NetworkInterfaceId=eid, SourceDestCheck={"Value": False})
    c.modify_network_interface_attribute(NetworkInterfaceId=eid, Groups=[gid, peer])
    c.assign_private_ip_addresses(NetworkInterfaceId=eid, PrivateIpAddresses=["198.18.0.91"])
    got = c.describe_network_interfaces(NetworkInterfaceIds=[eid])["NetworkInterfaces"][0]
    assert got["SourceDestCheck"] is False and len(got["Groups"]) == 2
    assert [a["PrivateIpAddress"] for a in got["PrivateIpAddresses"]] == ["198.18.0.90",
                                                                          "198.18.0.91"]
    c.unassign_private_ip_addresses(NetworkInterfaceId=eid, PrivateIpAddresses=["198.18.0.91"])
    rid = next(r["SecurityGroupRuleId"] for r in left if not r["IsEgress"])
    c.create_tags(Resources=[gid, eid, plid, rid], Tags=[{"Key": "env", "Value": "prod"}])
    tags = c.describe_tags(Filters=[{"Name": "key", "Values": ["env"]}])["Tags"]
    assert {(t["ResourceId"], t["ResourceType"]) for t in tags} == {
        (gid, "security-group"), (eid, "network-interface"), (plid, "prefix-list"),
        (rid, "security-group-rule")}
    tagged = c.describe_security_group_rules(Filters=[{"Name": "tag:env", "Values": ["prod"]}]
                                             )["SecurityGroupRules"]
    assert [r["SecurityGroupRuleId"] for r in tagged] == [rid]
    c.delete_tags(Resources=[plid, rid])  # every user tag
    assert c.describe_managed_prefix_lists(PrefixListIds=[plid])["PrefixLists"][0]["Tags"] == []
    c.delete_tags(Resources=[gid], Tags=[{"Key": "env", "Value": "not-prod"}])  # value differs
    c.delete_tags(Resources=[eid], Tags=[{"Key": "env"}])
    tags = c.describe_tags(Filters=[{"Name": "key", "Values": ["env"]}])["Tags"]
    assert [t["ResourceId"] for t in tags] == [gid]

    c.delete_network_interface(NetworkInterfaceId=eid)
    c.revoke_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "UserIdGroupPairs": [{"GroupId": peer}], "PrefixListIds": [{"PrefixListId": plid}]}])
    c.delete_managed_prefix_list(PrefixListId=plid)
    c.delete_security_group(GroupId=peer)
    c.delete_security_group(GroupId=gid)
    left_ids = {g["GroupId"] for g in c.describe_security_groups()["SecurityGroups"]}
    assert not {gid, peer} & left_ids
    assert rec.called == set(SERVED), f"not exercised: {set(SERVED) - rec.called}"


def test_errors_filters_pages_and_dry_run(ec2: Ec2Daemon) -> None:
    c = ec2.client()
    missing = "sg-0123456789abcdef0"
    assert code_of(c.describe_security_groups, GroupIds=[missing]) == "InvalidGroup.NotFound"
    assert code_of(c.delete_network_interface, NetworkInterfaceId="eni-0123456789abcdef0") == \
        "InvalidNetworkInterfaceID.NotFound"
    gids: List[str] = []
    for i in range(12):
        gids.append(c.create_security_group(GroupName=f"g{i:02d}", Description="d",
                                            TagSpecifications=[{
                                                "ResourceType": "security-group",
                                                "Tags": [{"Key": "tier", "Value": f"t{i % 3}"}]}]
                                            )["GroupId"])
    perm = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
            "IpRanges": [{"CidrIp": "198.18.9.0/24"}]}
    c.authorize_security_group_ingress(GroupId=gids[0], IpPermissions=[perm])
    assert code_of(c.authorize_security_group_ingress, GroupId=gids[0], IpPermissions=[perm]) == \
        "InvalidPermission.Duplicate"
    assert code_of(c.create_security_group, GroupName="g00", Description="d") == \
        "InvalidGroup.Duplicate"
    assert code_of(c.create_security_group, GroupName="dry", Description="d", DryRun=True) == \
        "DryRunOperation"
    assert code_of(c.create_security_group, GroupName="g00", Description="d", DryRun=True) == \
        "InvalidGroup.Duplicate"  # a dry run still says what would fail
    assert "dry" not in {g["GroupName"] for g in c.describe_security_groups()["SecurityGroups"]}
    assert code_of(c.describe_security_groups, Filters=[{"Name": "nonsense", "Values": ["x"]}]) \
        == "InvalidParameterValue"

    def names(**kw: Any) -> List[str]:
        return sorted(g["GroupName"] for g in c.describe_security_groups(**kw)["SecurityGroups"])

    assert names(Filters=[{"Name": "tag:tier", "Values": ["t1"]}]) == ["g01", "g04", "g07", "g10"]
    vpc = c.create_security_group(GroupName="in-vpc", Description="d", VpcId="vpc-0abc")["GroupId"]
    assert c.describe_security_groups(GroupIds=[vpc])["SecurityGroups"][0]["VpcId"] == "vpc-0abc"
    assert names(Filters=[{"Name": "vpc-id", "Values": ["vpc-0abc"]}]) == ["in-vpc"]
    c.delete_security_group(GroupId=vpc)
    assert names(Filters=[{"Name": "tag-key", "Values": ["tier"]},
                          {"Name": "group-name", "Values": ["g0*"]}]) == [
        f"g0{i}" for i in range(10)]
    assert names(Filters=[{"Name": "ip-permission.from-port", "Values": ["22"]}]) == ["g00"]
    assert names(Filters=[{"Name": "ip-permission.cidr", "Values": ["198.18.9.*"]}]) == ["g00"]
    assert names(Filters=[{"Name": "egress.ip-permission.cidr", "Values": ["0.0.0.0/0"]}]) == \
        names()
    pages = list(c.get_paginator("describe_security_groups").paginate(
        PaginationConfig={"PageSize": 5}))
    sizes = [len(p["SecurityGroups"]) for p in pages]
    seen = [g["GroupId"] for p in pages for g in p["SecurityGroups"]]
    everything = c.describe_security_groups()["SecurityGroups"]
    assert sizes[:-1] == [5] * (len(sizes) - 1) and 0 < sizes[-1] <= 5
    assert sorted(seen) == sorted(g["GroupId"] for g in everything) and set(gids) <= set(seen)
    assert code_of(c.describe_security_groups, MaxResults=5, NextToken="garbage") == \
        "InvalidNextToken"
    assert code_of(c.describe_security_groups, MaxResults=4000) == "InvalidParameterValue"
    rule_pages = list(c.get_paginator("describe_security_group_rules").paginate(
        PaginationConfig={"PageSize": 5}))
    paged = [r["SecurityGroupRuleId"] for p in rule_pages for r in p["SecurityGroupRules"]]
    whole = c.describe_security_group_rules()["SecurityGroupRules"]
    assert len(rule_pages) > 2 and sorted(paged) == sorted(r["SecurityGroupRuleId"] for r in whole)


def test_unsigned_and_badly_signed_requests_are_refused(ec2: Ec2Daemon) -> None:
    body = urlencode({"Action": "DescribeSecurityGroups", "Version": "2016-11-15"}).encode()
    status, text = ec2.raw("POST", body, sign=False)
    assert status == 401 and "<Code>AuthFailure</Code>" in text and "<RequestID>" in text
    assert code_of(ec2.client(secret="wrong").describe_security_groups) == "SignatureDoesNotMatch"
    assert code_of(ec2.client(key="AKIDUNKNOWN").describe_security_groups) == "AuthFailure"
    status, text = ec2.raw("POST", urlencode({"Action": "Apply", "Version": "2016-11-15"}
                                             ).encode())
    assert status == 400 and "<Code>InvalidAction</Code>" in text
    status, text = ec2.raw("POST", urlencode({"Action": "DescribeSecurityGroups",
                                              "Version": "2014-01-01"}).encode())
    assert status == 400 and "<Code>NoSuchVersion</Code>" in text
    status, text = ec2.raw("POST", body, headers={"Transfer-Encoding": "chunked"}, sign=False)
    assert status == 411
    status, text = ec2.raw("GET", query=body.decode())
    assert status == 200 and "<DescribeSecurityGroupsResponse" in text
    status, text = ec2.raw("POST", body + b"&Bogus.1=x")
    assert status == 400 and "<Code>UnknownParameter</Code>" in text
    ec2.daemon.proc.poll()
    assert ec2.daemon.proc.returncode is None  # still serving
    args = ec2.daemon.proc.args
    port = args[args.index("--metrics-address") + 1].rsplit(":", 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()

    def count(action: str, code: str) -> float:
        line = f'sgctl_ec2_requests_total{{action="{action}",code="{code}"}} '
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line))
    assert count("other", "AuthFailure") >= 2 and count("other", "SignatureDoesNotMatch") >= 1
    assert count("other", "InvalidAction") >= 1 and count("DescribeSecurityGroups", "OK") >= 1
    assert count("DescribeSecurityGroups", "UnknownParameter") >= 1
    assert "Apply" not in {ln.split('action="')[1].split('"')[0] for ln in text.splitlines()
                           if ln.startswith("sgctl_ec2_requests_total{")}


def normalised(groups: List[Dict[str, Any]], ids: Dict[str, str]) -> str:
    text = json.dumps(groups, sort_keys=True)
    for real, name in ids.items():
        text = text.replace(real, name)
    return text


def test_the_json_api_and_the_ec2_endpoint_reach_the_same_state(ec2: Ec2Daemon) -> None:
    """One sequence of calls through each encoding, on groups of their own:
    the groups they leave are the same but for their ids."""
    c = ec2.client()
    perm = {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
            "IpRanges": [{"CidrIp": "198.18.7.0/24", "Description": "tls"}]}
    out: Dict[str, str] = {}
    with ec2.daemon.client() as j:
        for via in ("json", "ec2"):
            def call(action: str, via: str = via, **params: Any) -> Dict[str, Any]:
                if via == "json":
                    return j.call(action, params)
                method = botocore.xform_name(action)
                return dict(getattr(c, method)(**params))
            a = call("CreateSecurityGroup", GroupName=f"a-{via}", Description="x",
                     TagSpecifications=[{"ResourceType": "security-group",
                                         "Tags": [{"Key": "k", "Value": "v"}]}])["GroupId"]
            b = call("CreateSecurityGroup", GroupName=f"b-{via}", Description="y")["GroupId"]
            call("AuthorizeSecurityGroupIngress", GroupId=a, IpPermissions=[
                perm, {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": b}]}])
            call("RevokeSecurityGroupEgress", GroupId=b, IpPermissions=[
                {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
            call("CreateTags", Resources=[b], Tags=[{"Key": "k2", "Value": "v2"}])
            groups = call("DescribeSecurityGroups", GroupIds=[a, b])["SecurityGroups"]
            for g in groups:
                g["GroupName"] = g["GroupName"].rsplit("-", 1)[0]
            out[via] = normalised(sorted(groups, key=lambda g: g["GroupName"]),
                                  {a: "A", b: "B"})
    assert out["json"] == out["ec2"]


def test_the_aws_cli_changes_what_traffic_passes(topo: Topology, ec2: Ec2Daemon) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]

    def aws(*args: str) -> Dict[str, Any]:
        res = ec2.aws(*args)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout) if res.stdout.strip() else {}

    gid = aws("create-security-group", "--group-name", unique("web"), "--description",
              "HTTP and HTTPS")["GroupId"]
    eid = aws("create-network-interface", "--subnet-id", "subnet-local", "--groups", gid,
              "--private-ip-address", web.ip4, "--tag-specifications",
              "ResourceType=network-interface,Tags=[{Key=host-interface,"
              f"Value={web.host_dev}}}]")["NetworkInterface"]["NetworkInterfaceId"]
    assert not cli.can_tcp(web.ip4, 80)
    start = time.monotonic()
    aws("authorize-security-group-ingress", "--group-id", gid, "--protocol", "tcp",
        "--port", "80", "--cidr", f"{cli.ip4}/32")
    print(f"aws ec2 authorize-security-group-ingress: {time.monotonic() - start:.2f} s "
          "(a process start included)")
    assert cli.can_tcp(web.ip4, 80), "allowed once the CLI call returned"
    assert not cli.can_tcp(web.ip4, 22)
    bad = ec2.aws("authorize-security-group-ingress", "--group-id", gid, "--protocol", "tcp",
                  "--port", "80", "--cidr", f"{cli.ip4}/32")
    assert bad.returncode != 0 and "InvalidPermission.Duplicate" in bad.stderr
    aws("revoke-security-group-ingress", "--group-id", gid, "--protocol", "tcp", "--port", "80",
        "--cidr", f"{cli.ip4}/32")
    assert not cli.can_tcp(web.ip4, 80)
    aws("delete-network-interface", "--network-interface-id", eid)  # the device is unbound
    aws("delete-security-group", "--group-id", gid)
    assert cli.can_tcp(web.ip4, 80)


def test_https_and_a_private_credentials_file(daemon: DaemonProc) -> None:
    ec2 = Ec2Daemon(daemon, tls=True)
    c = ec2.client()
    assert [g["GroupName"] for g in c.describe_security_groups()["SecurityGroups"]] == ["default"]
    ctx = ssl.create_default_context(cafile=ec2.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", ec2.port, context=ctx, timeout=10)
    try:  # plain HTTP requests on the HTTPS port get nowhere
        conn.request("POST", "/", body=b"Action=DescribeSecurityGroups")
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    os.chmod(ec2.creds, 0o644)
    res = daemon.cli("daemon", "--ec2-endpoint", "127.0.0.1:1", "--ec2-credentials", ec2.creds)
    assert res.returncode == 2 and "chmod 600" in res.stderr
