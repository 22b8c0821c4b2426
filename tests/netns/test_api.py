"""API contract: every action through the daemon's UNIX socket, every EC2
error code it can answer, and the all-or-nothing rule (a failed call changes
neither the desired state, nor its generation, nor the store)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest

from controller.policy.errors import ApiError
from controller.policy.formats import native
from controller.service.api import Client
from controller.service.daemon import Daemon, DaemonConfig
from controller.service.store import Store
from tests.harness import unique

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    tmp = tempfile.mkdtemp(prefix="sgctl-api-")
    cfg = DaemonConfig(state_dir=tmp, pin_dir=f"/sys/fs/bpf/{unique('sga')}",
                       socket=os.path.join(tmp, "api.sock"), ct_max=4096, gc_interval=3600,
                       metrics=None)
    d = Daemon(cfg)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        d.rc.reset()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def api(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.cfg.socket) as c:
        yield c


def snapshot(api: Client) -> Dict[str, Any]:
    return {"groups": api.call("DescribeSecurityGroups"),
            "rules": api.call("DescribeSecurityGroupRules"),
            "pls": api.call("DescribeManagedPrefixLists"),
            "enis": api.call("DescribeNetworkInterfaces"),
            "generation": api.request("GET", "/healthz")[1]["generation"]}


def expect_error(api: Client, code: str, action: str, params: Optional[Dict[str, Any]] = None
                 ) -> str:
    """The call fails with ``code`` and changes nothing."""
    before = snapshot(api)
    with pytest.raises(ApiError) as err:
        api.call(action, params or {})
    assert err.value.code == code, err.value.message
    assert snapshot(api) == before
    return err.value.message


def group(api: Client, name: Optional[str] = None) -> str:
    return str(api.call("CreateSecurityGroup", {"GroupName": name or unique("g"),
                                                "Description": "test"})["GroupId"])


def perm(proto: str = "tcp", lo: int = 80, hi: int = 80, cidrs: Sequence[str] = ("198.18.0.0/24",),
         groups: Sequence[str] = (), pls: Sequence[str] = ()) -> Dict[str, Any]:
    return {"IpProtocol": proto, "FromPort": lo, "ToPort": hi,
            "IpRanges": [{"CidrIp": c} for c in cidrs if ":" not in c],
            "Ipv6Ranges": [{"CidrIpv6": c} for c in cidrs if ":" in c],
            "UserIdGroupPairs": [{"GroupId": g} for g in groups],
            "PrefixListIds": [{"PrefixListId": p} for p in pls]}


def rules_of(api: Client, gid: str) -> List[Dict[str, Any]]:
    return list(api.call("DescribeSecurityGroupRules",
                         {"Filters": [{"Name": "group-id", "Values": [gid]}]})["SecurityGroupRules"])


# --------------------------------------------------------------------------- groups


def test_socket_is_private(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.cfg.socket).st_mode) == 0o600


def test_create_and_describe_group(api: Client) -> None:
    name = unique("web")
    gid = group(api, name)
    got = api.call("DescribeSecurityGroups", {"GroupIds": [gid]})["SecurityGroups"]
    assert [g["GroupName"] for g in got] == [name]
    assert got[0]["IpPermissions"] == []
    egress = got[0]["IpPermissionsEgress"]  # a new group allows all egress
    assert egress[0]["IpProtocol"] == "-1"
    assert {"CidrIp": "0.0.0.0/0"} in egress[0]["IpRanges"]
    by_name = api.call("DescribeSecurityGroups", {"GroupNames": [name]})["SecurityGroups"]
    assert by_name[0]["GroupId"] == gid


def test_create_group_errors(api: Client) -> None:
    name = unique("dup")
    group(api, name)
    expect_error(api, "InvalidGroup.Duplicate", "CreateSecurityGroup",
                 {"GroupName": name, "Description": "again"})
    expect_error(api, "MissingParameter", "CreateSecurityGroup", {"Description": "no name"})
    expect_error(api, "MissingParameter", "CreateSecurityGroup", {"GroupName": unique("x")})
    expect_error(api, "InvalidParameterValue", "CreateSecurityGroup",
                 {"GroupName": "sg-looks-like-an-id", "Description": "d"})


def test_delete_group_and_its_errors(api: Client) -> None:
    gid, ref = group(api), group(api)
    api.call("AuthorizeSecurityGroupIngress", {"GroupId": ref, "IpPermissions": [
        perm(cidrs=[], groups=[gid])]})
    msg = expect_error(api, "DependencyViolation", "DeleteSecurityGroup", {"GroupId": gid})
    assert ref in msg
    eni = api.call("CreateNetworkInterface", {"Groups": [ref]})["NetworkInterface"]
    msg = expect_error(api, "DependencyViolation", "DeleteSecurityGroup", {"GroupId": ref})
    assert eni["NetworkInterfaceId"] in msg
    api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eni["NetworkInterfaceId"]})
    api.call("DeleteSecurityGroup", {"GroupId": ref})
    api.call("DeleteSecurityGroup", {"GroupId": gid})
    expect_error(api, "InvalidGroup.NotFound", "DeleteSecurityGroup", {"GroupId": gid})
    expect_error(api, "CannotDelete", "DeleteSecurityGroup", {"GroupName": "default"})
    expect_error(api, "InvalidGroup.NotFound", "DescribeSecurityGroups", {"GroupIds": [gid]})


# --------------------------------------------------------------------------- rules


def test_authorize_and_revoke_by_permission_and_by_id(api: Client) -> None:
    gid = group(api)
    out = api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm(lo=80, hi=81, cidrs=["198.18.1.0/24", "2001:db8::/64"]), perm("icmp", 8, -1)]})
    assert len(out["SecurityGroupRules"]) == 3
    assert {r["IsEgress"] for r in out["SecurityGroupRules"]} == {False}
    ids = [r["SecurityGroupRuleId"] for r in out["SecurityGroupRules"]]
    assert {r["SecurityGroupRuleId"] for r in rules_of(api, gid)} >= set(ids)
    egress = api.call("AuthorizeSecurityGroupEgress", {"GroupId": gid, "IpPermissions": [
        perm("udp", 53, 53, cidrs=["198.18.0.53/32"])]})["SecurityGroupRules"]
    assert egress[0]["IsEgress"] is True
    api.call("RevokeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm(lo=80, hi=81, cidrs=["2001:db8::/64"])]})
    api.call("RevokeSecurityGroupIngress", {"GroupId": gid, "SecurityGroupRuleIds": [ids[0]]})
    left = {r["SecurityGroupRuleId"] for r in rules_of(api, gid)}
    assert ids[0] not in left and ids[1] not in left and ids[2] in left
    api.call("RevokeSecurityGroupEgress", {"GroupId": gid, "IpPermissions": [
        perm("udp", 53, 53, cidrs=["198.18.0.53/32"])]})
    assert all(r["IsEgress"] is False or r.get("CidrIpv4") == "0.0.0.0/0"
               for r in rules_of(api, gid))


def test_authorize_errors_change_nothing(api: Client) -> None:
    gid = group(api)
    api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [perm()]})
    expect_error(api, "InvalidPermission.Duplicate", "AuthorizeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm(lo=22, hi=22), perm()]})
    expect_error(api, "InvalidPermission.Duplicate", "AuthorizeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm(lo=23, hi=23), perm(lo=23, hi=23)]})
    # one bad permission in a batch: the good ones are not added either
    msg = expect_error(api, "InvalidParameterValue", "AuthorizeSecurityGroupIngress",
                       {"GroupId": gid, "IpPermissions": [perm(lo=443, hi=443),
                                                          perm(lo=1, hi=99999)]})
    assert "ToPort" in msg and "99999" in msg
    expect_error(api, "InvalidParameterValue", "AuthorizeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm(cidrs=["198.18.0.300/24"])]})
    expect_error(api, "InvalidParameterValue", "AuthorizeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm("icmp", -1, 3)]})
    expect_error(api, "InvalidGroup.NotFound", "AuthorizeSecurityGroupIngress",
                 {"GroupId": "sg-doesnotexist", "IpPermissions": [perm()]})
    expect_error(api, "InvalidGroup.NotFound", "AuthorizeSecurityGroupEgress",
                 {"GroupId": gid, "IpPermissions": [perm(cidrs=[], groups=["sg-nothere"])]})
    expect_error(api, "InvalidPrefixListID.NotFound", "AuthorizeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm(cidrs=[], pls=["pl-nothere"])]})
    expect_error(api, "MissingParameter", "AuthorizeSecurityGroupIngress", {"GroupId": gid})


def test_revoke_errors_change_nothing(api: Client) -> None:
    gid = group(api)
    rid = api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm()]})["SecurityGroupRules"][0]["SecurityGroupRuleId"]
    expect_error(api, "InvalidPermission.NotFound", "RevokeSecurityGroupIngress",
                 {"GroupId": gid, "IpPermissions": [perm(), perm(lo=81, hi=81)]})
    expect_error(api, "InvalidSecurityGroupRuleId.NotFound", "RevokeSecurityGroupIngress",
                 {"GroupId": gid, "SecurityGroupRuleIds": [rid, "sgr-00000000000000000"]})
    expect_error(api, "InvalidSecurityGroupRuleId.NotFound", "RevokeSecurityGroupEgress",
                 {"GroupId": gid, "SecurityGroupRuleIds": [rid]})  # it is an ingress rule
    expect_error(api, "InvalidParameterCombination", "RevokeSecurityGroupIngress",
                 {"GroupId": gid, "SecurityGroupRuleIds": [rid], "IpPermissions": [perm()]})


def test_modify_rules(api: Client) -> None:
    gid = group(api)
    rules = api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm(lo=80, hi=80), perm(lo=81, hi=81)]})["SecurityGroupRules"]
    rid, other = rules[0]["SecurityGroupRuleId"], rules[1]["SecurityGroupRuleId"]
    api.call("ModifySecurityGroupRules", {"GroupId": gid, "SecurityGroupRules": [{
        "SecurityGroupRuleId": rid, "SecurityGroupRule": {
            "IpProtocol": "udp", "FromPort": 5000, "ToPort": 5001, "CidrIpv6": "2001:db8::/48",
            "Description": "moved"}}]})
    got = api.call("DescribeSecurityGroupRules", {"SecurityGroupRuleIds": [rid]})
    r = got["SecurityGroupRules"][0]
    assert (r["IpProtocol"], r["FromPort"], r["ToPort"], r["CidrIpv6"], r["Description"]) == (
        "udp", 5000, 5001, "2001:db8::/48", "moved")
    expect_error(api, "InvalidSecurityGroupRuleId.NotFound", "ModifySecurityGroupRules",
                 {"GroupId": gid, "SecurityGroupRules": [{
                     "SecurityGroupRuleId": "sgr-00000000000000000",
                     "SecurityGroupRule": {"IpProtocol": "tcp", "FromPort": 1, "ToPort": 1,
                                           "CidrIpv4": "198.18.0.0/24"}}]})
    expect_error(api, "InvalidParameterCombination", "ModifySecurityGroupRules",
                 {"GroupId": gid, "SecurityGroupRules": [{
                     "SecurityGroupRuleId": rid, "SecurityGroupRule": {
                         "IpProtocol": "tcp", "FromPort": 1, "ToPort": 1,
                         "CidrIpv4": "198.18.0.0/24", "PrefixListId": "pl-x"}}]})
    expect_error(api, "InvalidPermission.Duplicate", "ModifySecurityGroupRules",
                 {"GroupId": gid, "SecurityGroupRules": [{
                     "SecurityGroupRuleId": other, "SecurityGroupRule": {
                         "IpProtocol": "udp", "FromPort": 5000, "ToPort": 5001,
                         "CidrIpv6": "2001:db8::/48"}}]})
    expect_error(api, "InvalidSecurityGroupRuleId.NotFound", "DescribeSecurityGroupRules",
                 {"SecurityGroupRuleIds": ["sgr-00000000000000000"]})


# --------------------------------------------------------------------------- prefix lists


def test_prefix_lists(api: Client) -> None:
    pl = api.call("CreateManagedPrefixList", {
        "PrefixListName": unique("pl"), "AddressFamily": "IPv4", "MaxEntries": 2,
        "Entries": [{"Cidr": "198.18.5.0/24", "Description": "office"}]})["PrefixList"]
    plid = pl["PrefixListId"]
    assert pl["Version"] == 1
    out = api.call("ModifyManagedPrefixList", {"PrefixListId": plid, "CurrentVersion": 1,
                                               "AddEntries": [{"Cidr": "198.18.6.0/24"}]})
    assert out["PrefixList"]["Version"] == 2
    entries = api.call("GetManagedPrefixListEntries", {"PrefixListId": plid})["Entries"]
    assert [e["Cidr"] for e in entries] == ["198.18.5.0/24", "198.18.6.0/24"]
    expect_error(api, "PrefixListVersionMismatch", "ModifyManagedPrefixList",
                 {"PrefixListId": plid, "CurrentVersion": 1,
                  "RemoveEntries": [{"Cidr": "198.18.5.0/24"}]})
    expect_error(api, "PrefixListMaxEntriesExceeded", "ModifyManagedPrefixList",
                 {"PrefixListId": plid, "AddEntries": [{"Cidr": "198.18.7.0/24"}]})
    expect_error(api, "InvalidParameterValue", "ModifyManagedPrefixList",
                 {"PrefixListId": plid, "AddEntries": [{"Cidr": "2001:db8::/64"}]})
    expect_error(api, "InvalidParameterValue", "ModifyManagedPrefixList",
                 {"PrefixListId": plid, "RemoveEntries": [{"Cidr": "198.18.9.0/24"}]})
    expect_error(api, "InvalidParameterValue", "CreateManagedPrefixList",
                 {"PrefixListName": "x", "AddressFamily": "IPv5", "MaxEntries": 1})
    expect_error(api, "InvalidPrefixListID.NotFound", "GetManagedPrefixListEntries",
                 {"PrefixListId": "pl-nothere"})
    gid = group(api)
    api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm(cidrs=[], pls=[plid])]})
    expect_error(api, "DependencyViolation", "DeleteManagedPrefixList", {"PrefixListId": plid})
    api.call("RevokeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        perm(cidrs=[], pls=[plid])]})
    api.call("DeleteManagedPrefixList", {"PrefixListId": plid})
    ids = [p["PrefixListId"] for p in api.call("DescribeManagedPrefixLists")["PrefixLists"]]
    assert plid not in ids
    expect_error(api, "InvalidPrefixListID.NotFound", "DeleteManagedPrefixList",
                 {"PrefixListId": plid})


# --------------------------------------------------------------------------- interfaces


def test_network_interfaces(api: Client) -> None:
    g1, g2 = group(api), group(api)
    eni = api.call("CreateNetworkInterface", {
        "Groups": [g1], "PrivateIpAddresses": [{"PrivateIpAddress": "198.18.3.1"}],
        "Ipv6Addresses": [{"Ipv6Address": "2001:db8::3:1"}],
        "ConnectionTrackingSpecification": {"TcpEstablishedTimeout": 3600},
        "TagSpecifications": [{"ResourceType": "network-interface", "Tags": [
            {"Key": "host-interface-revalidate", "Value": "true"}]}],
        "Description": "db"})["NetworkInterface"]
    eid = eni["NetworkInterfaceId"]
    assert {"Key": "host-interface-revalidate", "Value": "true"} in eni["TagSet"]
    assert eni["PrivateIpAddress"] == "198.18.3.1"
    assert eni["ConnectionTrackingConfiguration"]["TcpEstablishedTimeout"] == 3600
    api.call("ModifyNetworkInterfaceAttribute", {"NetworkInterfaceId": eid, "Groups": [g1, g2],
                                                 "ConnectionTrackingSpecification": {
                                                     "UdpStreamTimeout": 120}})
    api.call("AssignPrivateIpAddresses", {"NetworkInterfaceId": eid,
                                          "PrivateIpAddresses": ["198.18.3.2"]})
    got = api.call("DescribeNetworkInterfaces", {"NetworkInterfaceIds": [eid]})
    e = got["NetworkInterfaces"][0]
    assert [g["GroupId"] for g in e["Groups"]] == [g1, g2]
    assert e["ConnectionTrackingConfiguration"] == {"TcpEstablishedTimeout": 3600,
                                                    "UdpStreamTimeout": 120, "UdpTimeout": 30}
    assert [a["PrivateIpAddress"] for a in e["PrivateIpAddresses"]] == ["198.18.3.1", "198.18.3.2"]
    api.call("UnassignPrivateIpAddresses", {"NetworkInterfaceId": eid,
                                            "PrivateIpAddresses": ["198.18.3.1"]})
    expect_error(api, "InvalidParameterValue", "UnassignPrivateIpAddresses",
                 {"NetworkInterfaceId": eid, "PrivateIpAddresses": ["198.18.3.1"]})
    expect_error(api, "InvalidParameterValue", "ModifyNetworkInterfaceAttribute",
                 {"NetworkInterfaceId": eid,
                  "ConnectionTrackingSpecification": {"UdpTimeout": 5}})
    expect_error(api, "InvalidGroup.NotFound", "ModifyNetworkInterfaceAttribute",
                 {"NetworkInterfaceId": eid, "Groups": ["sg-nothere"]})
    many = [group(api) for _ in range(17)]
    expect_error(api, "SecurityGroupsPerInterfaceLimitExceeded", "ModifyNetworkInterfaceAttribute",
                 {"NetworkInterfaceId": eid, "Groups": many})
    for g in many:
        api.call("DeleteSecurityGroup", {"GroupId": g})
    api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eid})
    expect_error(api, "InvalidNetworkInterfaceID.NotFound", "DeleteNetworkInterface",
                 {"NetworkInterfaceId": eid})
    expect_error(api, "InvalidNetworkInterfaceID.NotFound", "DescribeNetworkInterfaces",
                 {"NetworkInterfaceIds": [eid]})


def test_source_dest_check_attribute(api: Client) -> None:
    """SourceDestCheck: true unless told, EC2's {"Value": false} to turn it
    off, shown by DescribeNetworkInterfaces; MacAddress gives the link-local."""
    g = group(api)
    eni = api.call("CreateNetworkInterface", {
        "Groups": [g], "PrivateIpAddresses": [{"PrivateIpAddress": "198.18.3.9"}],
        "MacAddress": "02:AA:00:00:00:09"})["NetworkInterface"]
    eid = eni["NetworkInterfaceId"]
    assert eni["SourceDestCheck"] is True
    assert eni["MacAddress"] == "02:aa:00:00:00:09"
    assert eni["Ipv6LinkLocalAddress"] == "fe80::aa:ff:fe00:9"
    api.call("ModifyNetworkInterfaceAttribute", {"NetworkInterfaceId": eid,
                                                 "SourceDestCheck": {"Value": False}})
    e = api.call("DescribeNetworkInterfaces", {"NetworkInterfaceIds": [eid]})
    assert e["NetworkInterfaces"][0]["SourceDestCheck"] is False
    expect_error(api, "InvalidParameterValue", "ModifyNetworkInterfaceAttribute",
                 {"NetworkInterfaceId": eid, "SourceDestCheck": {"Value": "maybe"}})
    expect_error(api, "InvalidParameterValue", "CreateNetworkInterface",
                 {"Groups": [g], "MacAddress": "01:00:5e:00:00:01"})  # multicast
    api.call("ModifyNetworkInterfaceAttribute", {"NetworkInterfaceId": eid,
                                                 "SourceDestCheck": {"Value": True}})
    e = api.call("DescribeNetworkInterfaces", {"NetworkInterfaceIds": [eid]})
    assert e["NetworkInterfaces"][0]["SourceDestCheck"] is True
    api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eid})


# --------------------------------------------------------------------------- whole state, transport


def test_apply_whole_state_and_bad_document(api: Client, daemon: Daemon) -> None:
    doc = {"sgctl": 1, "groups": {"sg-only": {"name": "only", "ingress": [
        {"proto": "tcp", "ports": 22, "from": "198.18.0.0/16"}]}}}
    bad = {"sgctl": 1, "groups": {"sg-only": {"name": "only", "ingress": [
        {"proto": "tcp", "ports": "22-1", "from": "198.18.0.0/16"}]}}}
    msg = expect_error(api, "InvalidParameterValue", "Apply", {"Document": bad})
    assert "sg-only ingress[0]" in msg and "reversed" in msg
    out = api.call("Apply", {"Document": json.dumps(doc)})  # replaces everything
    assert out["Groups"] == 2 and out["Rules"] == 5  # + the default group's 3
    names = [g["GroupName"] for g in api.call("DescribeSecurityGroups")["SecurityGroups"]]
    assert sorted(names) == ["default", "only"]
    assert api.call("DescribeNetworkInterfaces")["NetworkInterfaces"] == []
    expect_error(api, "MissingParameter", "Apply", {})


def test_store_holds_what_was_accepted(api: Client, daemon: Daemon) -> None:
    group(api)
    stored = Store(daemon.cfg.state_dir).load()
    assert stored is not None
    assert stored.generation == api.request("GET", "/healthz")[1]["generation"]
    assert native.dump(stored.state) == native.dump(daemon.state)


def test_transport_errors(api: Client) -> None:
    expect_error(api, "InvalidAction", "LaunchInstances")
    status, body = api.request("POST", "/DescribeSecurityGroups", None)
    assert status == 200 and "SecurityGroups" in body
    api.conn.request("POST", "/", body=b"{not json", headers={"Content-Length": "9"})
    resp = api.conn.getresponse()
    assert resp.status == 400
    assert json.loads(resp.read())["Error"]["Code"] == "MalformedQueryString"


def test_openapi_document_lists_every_action() -> None:
    import yaml

    from controller.policy.actions import ACTIONS

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())
    paths = {p.strip("/") for p in doc["paths"]}
    own = {"Apply", "DescribeStatus", "DescribeConntrack", "FlushConntrack", "Explain",
           "GetFlowLogRecords", "FlushFlowLogs", "healthz"}
    assert paths == set(ACTIONS) | own


# --------------------------------------------------------------------------- hostile transport


def raw_exchange(path: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything the daemon answers
    until it closes the connection (or ``wait`` seconds pass)."""
    import socket as sk
    import time

    out = b""
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        s.connect(path)
        try:
            s.sendall(data)
        except BrokenPipeError:  # the daemon answered and closed before reading it all
            pass
        s.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, OSError):
            pass
    return out


def post(body: bytes, length: Optional[str] = None, extra: str = "") -> bytes:
    head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) if length is None else length}" \
           f"\r\n{extra}\r\n"
    return head.encode() + body


def test_content_length_must_be_an_exact_byte_count(api: Client, daemon: Daemon) -> None:
    body = json.dumps({"Action": "DescribeSecurityGroups"}).encode()
    for length in ("-1", "+5", "0x10", "1e3", " ", "99999999999999"):
        out = raw_exchange(daemon.cfg.socket, post(body, length))
        assert out.startswith(b"HTTP/1.1 4"), (length, out[:80])
        assert out.count(b"HTTP/1.1") == 1 and b"Connection: close" in out
    out = raw_exchange(daemon.cfg.socket, post(b"", extra="Transfer-Encoding: chunked\r\n")
                       + b"5\r\nhello\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411") and out.count(b"HTTP/1.1") == 1


def test_an_oversized_body_is_not_read_as_the_next_request(api: Client, daemon: Daemon) -> None:
    from controller.service.api import MAX_BODY

    victim = group(api)
    smuggled = json.dumps({"Action": "DeleteSecurityGroup", "GroupId": victim}).encode()
    inner = post(smuggled)
    out = raw_exchange(daemon.cfg.socket, post(inner, str(MAX_BODY + 1)))
    assert out.startswith(b"HTTP/1.1 413") and out.count(b"HTTP/1.1") == 1, out[:200]
    assert victim in [g["GroupId"] for g in api.call("DescribeSecurityGroups")["SecurityGroups"]]
    # after any error the connection is closed: a body that fails to parse
    # cannot carry a second request behind it either
    out = raw_exchange(daemon.cfg.socket, post(b"{bad", "4") + inner)
    assert out.count(b"HTTP/1.1") == 1 and out.startswith(b"HTTP/1.1 400")
    assert victim in [g["GroupId"] for g in api.call("DescribeSecurityGroups")["SecurityGroups"]]


def test_idle_connections_time_out_and_are_bounded(daemon: Daemon, monkeypatch) -> None:
    import socket as sk
    import time

    from controller.service import api as api_mod

    monkeypatch.setattr(api_mod._RequestHandler, "timeout", 0.5)
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        s.connect(daemon.cfg.socket)
        s.settimeout(10)
        start = time.monotonic()
        assert s.recv(100) == b""  # closed by the daemon, not by us
        assert time.monotonic() - start < 5
    assert daemon.server is not None
    # leave 2 of the server's own slots free (swapping the semaphore would
    # let a thread started before the swap release into the other one)
    slots = daemon.server.slots
    taken = 0
    while slots.acquire(blocking=False):
        taken += 1
    for _ in range(2):
        slots.release()
        taken -= 1
    monkeypatch.setattr(api_mod._RequestHandler, "timeout", 30.0)
    held = [sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) for _ in range(2)]
    try:
        for s in held:
            s.connect(daemon.cfg.socket)
        time.sleep(0.2)
        out = raw_exchange(daemon.cfg.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503") and b"ServiceUnavailable" in out
    finally:
        for s in held:
            s.close()
        for _ in range(taken):
            slots.release()
    time.sleep(0.3)
    out = raw_exchange(daemon.cfg.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                       b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("action, params", [
    ("DeleteSecurityGroup", {"GroupId": ["sg-x"]}),
    ("DescribeSecurityGroups", {"GroupIds": [["sg-x"]]}),
    ("DescribeSecurityGroupRules", {"SecurityGroupRuleIds": [{}]}),
    ("AuthorizeSecurityGroupIngress", {"GroupName": "default", "IpPermissions": "tcp"}),
    ("CreateManagedPrefixList", {"PrefixListName": "p", "AddressFamily": "IPv4",
                                 "MaxEntries": "5"}),
    ("CreateNetworkInterface", {"Description": ["x"]}),
    ("Apply", {"Document": {"sgctl": 1}, "StackName": 5}),
    ("Apply", {"Document": "a: &a [x, x]\nb: [*a, *a]\n"}),
    ("Apply", {"Document": {"sgctl": 1, "groups": {"sg-a": {"name": ["x"]}}}}),
    ("DescribeConntrack", {"NetworkInterfaceId": ["eni-x"]}),
    ("FlushConntrack", {"NetworkInterfaceId": {"a": 1}}),
    ("CreateSecurityGroup", {"GroupName": "default", "Description": "mine"}),
])
def test_wrong_parameter_types_are_400(api: Client, action: str, params: Dict[str, Any]) -> None:
    expect_error(api, "InvalidParameterValue", action, params)


def test_apply_returns_the_loaders_warnings(api: Client) -> None:
    text = (Path(__file__).resolve().parents[1] / "data" / "seed-template.yaml").read_text()
    out = api.call("Apply", {"Document": text, "StackName": "seed"})
    assert len(out["Warnings"]) == 5
    assert out["Rules"] == 4 + 1 + 3  # + default egress (IPv4 only) + the default group


# --------------------------------------------------------------------------- failures mid-apply


def _bind_doc(devs: List[str], port: int) -> Dict[str, Any]:
    return {"sgctl": 1, "groups": {"sg-f": {"name": "f", "ingress": [
        {"proto": "tcp", "ports": port, "from": "198.18.0.0/16"}]}},
        "interfaces": {f"eni-f{i}": {"groups": ["sg-f"], "ipv4": [f"198.18.7.{i + 1}"],
                                     "device": d} for i, d in enumerate(devs)}}


def _endpoints(daemon: Daemon) -> Dict[int, bytes]:
    return {int(k.value): bytes(v) for k, v in daemon.dp.map("sg_endpoints").items()}


def _xdp(dev: str) -> int:
    from controller.kernel import netlink

    idx = netlink.ifindex(dev)
    assert idx is not None
    return int(netlink.attached(idx)["xdp_prog_id"])


def test_commit_rolls_back_a_failed_tc_attach(api: Client, daemon: Daemon, test_devs: List[str],
                                              monkeypatch) -> None:
    """tc fails after XDP succeeded on a new device: the device is left as it
    was (no XDP program, no endpoint), the others stay on the old policy."""
    from pyroute2.netlink.exceptions import NetlinkError

    from controller.kernel import netlink

    one, two = test_devs
    api.call("Apply", {"Document": _bind_doc([one], 22)})
    before, state_before = _endpoints(daemon), snapshot(api)
    assert _xdp(one) and not _xdp(two)

    real = netlink.IPRoute

    class FailingTc:
        """pyroute2's IPRoute, except that adding a tc filter fails."""

        def __init__(self) -> None:
            self.ipr = real()

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.ipr.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ipr, name)

        def tc(self, command: str, *args: Any, **kw: Any) -> Any:
            if command == "replace-filter":
                raise NetlinkError(95, "injected: tc filter refused")
            return self.ipr.tc(command, *args, **kw)

    monkeypatch.setattr(netlink, "IPRoute", FailingTc)
    with pytest.raises(ApiError) as err:
        api.call("Apply", {"Document": _bind_doc([one, two], 80)})
    assert err.value.code == "InternalError" and "injected" in err.value.message
    assert not _xdp(two), "the XDP program attached before tc failed is detached again"
    assert _endpoints(daemon) == before, "endpoints are back on the previous policy"
    assert snapshot(api) == state_before
    monkeypatch.undo()
    api.call("Apply", {"Document": _bind_doc([one, two], 80)})
    assert _xdp(two) and len(_endpoints(daemon)) == 2


def test_commit_rolls_back_a_netlink_error_after_the_switch(api: Client, daemon: Daemon,
                                                            test_devs: List[str],
                                                            monkeypatch) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from controller.reconcile import converge

    one, _ = test_devs
    api.call("Apply", {"Document": _bind_doc([one], 22)})
    before, state_before = _endpoints(daemon), snapshot(api)

    def fail(*args: Any) -> None:
        raise NetlinkError(16, "injected: busy")

    monkeypatch.setattr(converge, "sync_exempt", fail)
    with pytest.raises(ApiError) as err:  # the endpoint was switched before this failed
        api.call("Apply", {"Document": _bind_doc([one], 443)})
    assert "injected" in err.value.message
    monkeypatch.undo()
    assert snapshot(api) == state_before
    assert _endpoints(daemon) == before, "the interface is back on the accepted policy"


# --------------------------------------------------------------------------- the daemon's own actions

OWN_ACTIONS = ["Apply", "DescribeStatus", "DescribeConntrack", "FlushConntrack", "Explain",
               "GetFlowLogRecords", "FlushFlowLogs"]
OWN_PARAMS = ["Document", "StackName", "Maps", "NetworkInterfaceId", "Direction", "Source",
              "Destination", "Protocol", "Port", "SourcePort", "IcmpType", "IcmpCode",
              "TcpFlags", "Filters", "Since", "MaxResults"]


def test_daemon_actions_give_clean_errors(daemon: Daemon) -> None:
    """The fuzz of tests/test_fuzz.py, on the actions only the daemon has
    (they need its dataplane): only ApiError comes out, never a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.unit.test_fuzz import EXAMPLES, hostile

    tried = []

    @settings(max_examples=max(50, EXAMPLES // 3), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(OWN_ACTIONS),
           st.dictionaries(st.sampled_from(OWN_PARAMS), hostile, max_size=5))
    def run(action: str, params: Dict[str, Any]) -> None:
        tried.append(action)
        try:
            daemon.handle(action, params)
        except ApiError as exc:
            assert exc.status < 500, f"{action} {params!r}: {exc}"

    run()
    assert set(tried) == set(OWN_ACTIONS)
