"""The EC2 Query protocol against botocore itself: what botocore's EC2
serializer writes, ``wire.parse`` reads back exactly; what ``wire.answer``
writes, botocore's EC2 parser reads as the result; signatures botocore makes
verify, anything else is refused by name."""

from __future__ import annotations

import datetime
import os
import stat
from typing import Any, Dict, List, Tuple
from urllib.parse import parse_qsl, urlencode

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import EC2QueryParser
from botocore.serialize import EC2Serializer

from controller.policy.errors import ApiError
from controller.service.ec2 import sigv4, wire
from controller.service.ec2.server import SERVED

PERM = {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 443,
        "IpRanges": [{"CidrIp": "198.18.0.0/24", "Description": "lan"},
                     {"CidrIp": "198.18.1.0/24"}],
        "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/64"}],
        "PrefixListIds": [{"PrefixListId": "pl-0123456789abcdef0"}],
        "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0", "Description": "peers"}]}

# (operation, parameters as boto3 takes them)
REQUESTS: List[Tuple[str, Dict[str, Any]]] = [
    ("CreateSecurityGroup", {"GroupName": "web", "Description": "web servers",
                             "TagSpecifications": [{"ResourceType": "security-group",
                                                    "Tags": [{"Key": "team", "Value": "a"}]}]}),
    ("AuthorizeSecurityGroupIngress", {"GroupId": "sg-1", "IpPermissions": [PERM, PERM]}),
    ("RevokeSecurityGroupEgress", {"GroupId": "sg-1", "SecurityGroupRuleIds": ["sgr-1", "sgr-2"]}),
    ("DescribeSecurityGroups", {"Filters": [{"Name": "tag:team", "Values": ["a", "b*"]}],
                                "MaxResults": 5, "NextToken": "abc", "DryRun": True}),
    ("ModifySecurityGroupRules", {"GroupId": "sg-1", "SecurityGroupRules": [
        {"SecurityGroupRuleId": "sgr-1", "SecurityGroupRule": {
            "IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "CidrIpv4": "198.18.0.0/15"}}]}),
    ("CreateManagedPrefixList", {"PrefixListName": "office", "MaxEntries": 10,
                                 "AddressFamily": "IPv4",
                                 "Entries": [{"Cidr": "198.18.0.0/24", "Description": "x"}]}),
    ("ModifyNetworkInterfaceAttribute", {"NetworkInterfaceId": "eni-1",
                                         "SourceDestCheck": {"Value": False},
                                         "Groups": ["sg-1", "sg-2"]}),
    ("CreateNetworkInterface", {"SubnetId": "subnet-1", "Groups": ["sg-1"],
                                "PrivateIpAddresses": [{"PrivateIpAddress": "198.18.0.9",
                                                        "Primary": True}],
                                "ConnectionTrackingSpecification": {"UdpTimeout": 40}}),
    ("AssignPrivateIpAddresses", {"NetworkInterfaceId": "eni-1",
                                  "PrivateIpAddresses": ["198.18.0.5", "198.18.0.6"]}),
    ("CreateTags", {"Resources": ["sg-1", "eni-1"], "Tags": [{"Key": "k", "Value": ""}]}),
    ("DeleteTags", {"Resources": ["sg-1"], "Tags": [{"Key": "k"}]}),
]


def wire_pairs(action: str, params: Dict[str, Any]) -> List[Tuple[str, str]]:
    op = wire.operation(action)
    body = EC2Serializer().serialize_to_request(params, op)["body"]
    return [(k, str(v)) for k, v in body.items()]


@pytest.mark.parametrize("action,params", REQUESTS, ids=[a for a, _ in REQUESTS])
def test_parse_reads_back_what_botocore_writes(action: str, params: Dict[str, Any]) -> None:
    pairs = wire_pairs(action, params)
    got_action, version, rest = wire.action_of(pairs)
    assert (got_action, version) == (action, wire.API_VERSION)
    assert wire.parse(rest, wire.operation(action)) == params


def test_every_served_action_is_an_ec2_operation_and_the_rest_are_ours() -> None:
    from controller.policy.actions import ACTIONS

    ops = set(wire.service().operation_names)
    assert set(SERVED) == set(ACTIONS) & ops
    assert {"CreateTags", "DescribeTags", "AuthorizeSecurityGroupIngress",
            "DescribeNetworkInterfaces"} <= set(SERVED)


@pytest.mark.parametrize("pairs,code", [
    ([("Bogus", "1")], "UnknownParameter"),
    ([("IpPermissions.x.IpProtocol", "tcp")], "InvalidParameter"),
    ([("IpPermissions.0.IpProtocol", "tcp")], "InvalidParameter"),
    ([("IpPermissions.1", "tcp")], "InvalidParameterValue"),
    ([("IpPermissions.1.FromPort", "eighty")], "InvalidParameterValue"),
    ([("GroupId", "a"), ("GroupId.Nested", "b")], "InvalidParameter"),
    ([("GroupId", "a"), ("GroupId", "b")], "InvalidParameterCombination"),
    ([("DryRun", "maybe")], "InvalidParameterValue"),
    ([("IpPermissions.1..IpProtocol", "tcp")], "InvalidParameter"),
    ([("IpPermissions." + ".".join(["1"] * 20), "x")], "InvalidParameter"),
    ([(f"IpPermissions.{wire.MAX_INDEX + 1}.IpProtocol", "tcp")], "InvalidParameter"),
    ([(f"GroupName.{i}", "x") for i in range(wire.MAX_PARAMS + 1)], "InvalidParameterValue"),
])
def test_malformed_requests_are_refused_by_name(pairs: List[Tuple[str, str]], code: str) -> None:
    with pytest.raises(ApiError) as exc:
        wire.parse(pairs, wire.operation("AuthorizeSecurityGroupIngress"))
    assert exc.value.code == code


def test_answers_read_back_through_botocores_parser() -> None:
    from controller.policy.actions import run
    from controller.policy.model import State

    state = State()
    gid = run(state, "CreateSecurityGroup", {"GroupName": "web", "Description": "d", "Tags": [
        {"Key": "team", "Value": "a"}]})["GroupId"]
    rules = run(state, "AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
         "IpRanges": [{"CidrIp": "198.18.0.0/24", "Description": "lan"}]}]})
    described = run(state, "DescribeSecurityGroups", {"GroupIds": [gid]})
    for action, result in (("AuthorizeSecurityGroupIngress", rules),
                           ("DescribeSecurityGroups", described)):
        op = wire.operation(action)
        body = wire.answer(op, result, "rid-1")
        parsed = EC2QueryParser().parse({"body": body, "headers": {}, "status_code": 200},
                                        op.output_shape)
        assert parsed.pop("ResponseMetadata")["RequestId"] == "rid-1"
        assert parsed == result


def test_errors_read_back_through_botocores_parser() -> None:
    body = wire.error("InvalidGroup.NotFound", "The security group 'sg-1' does not exist", "r")
    parsed = EC2QueryParser().parse({"body": body, "headers": {}, "status_code": 400}, None)
    assert parsed["Error"] == {"Code": "InvalidGroup.NotFound",
                               "Message": "The security group 'sg-1' does not exist"}
    assert parsed["ResponseMetadata"]["RequestId"] == "r"


# --------------------------------------------------------------------------- SigV4


KEY, SECRET = "AKIDSGCTLUNIT", "s3cret/with+chars"


@pytest.fixture
def keys(tmp_path) -> sigv4.Keys:
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"
                    "[ops]\naws_access_key_id = AKIDOPS\naws_secret_access_key = other\n")
    path.chmod(0o600)
    return sigv4.Keys(str(path))


def signed(body: bytes, secret: str = SECRET, when: Any = None, key: str = KEY,
           region: str = "eu-west-1") -> Dict[str, str]:
    req = AWSRequest(method="POST", url="http://127.0.0.1:9650/", data=body, headers={
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    signer = SigV4Auth(Credentials(key, secret), "ec2", region)
    if when is None:
        signer.add_auth(req)
    else:  # botocore signs "now": sign at another time by hand
        req.headers["X-Amz-Date"] = when.strftime("%Y%m%dT%H%M%SZ")
        req.headers["Host"] = "127.0.0.1:9650"
        req.context["timestamp"] = req.headers["X-Amz-Date"]
        canonical = signer.canonical_request(req)
        sig = signer.signature(signer.string_to_sign(req, canonical), req)
        scope = signer.credential_scope(req)
        req.headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={key}/{scope}, "
            f"SignedHeaders={signer.signed_headers(signer.headers_to_sign(req))}, Signature={sig}")
    return {k: v for k, v in req.headers.items()}


BODY = urlencode({"Action": "DescribeSecurityGroups", "Version": wire.API_VERSION}).encode()


def test_a_botocore_signature_verifies(keys: sigv4.Keys) -> None:
    got = sigv4.verify(keys, "POST", "127.0.0.1:9650", "/", signed(BODY), BODY)
    assert (got.access_key, got.region) == (KEY, "eu-west-1")


@pytest.mark.parametrize("change,code", [
    (lambda h, b: (h, b + b"&DryRun=true"), "SignatureDoesNotMatch"),  # body changed
    (lambda h, b: ({**h, "X-Amz-Date": "20260101T000000Z"}, b), "RequestExpired"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "Authorization"}, b), "AuthFailure"),
    (lambda h, b: ({**h, "Authorization": "Basic dXNlcjpwYXNz"}, b), "AuthFailure"),
    (lambda h, b: ({**h, "X-Amz-Security-Token": "t"}, b), "AuthFailure"),
])
def test_tampered_requests_are_refused(keys: sigv4.Keys, change: Any, code: str) -> None:
    headers, body = change(signed(BODY), BODY)
    with pytest.raises(ApiError) as exc:
        sigv4.verify(keys, "POST", "127.0.0.1:9650", "/", headers, body)
    assert exc.value.code == code


def test_wrong_secrets_unknown_keys_and_old_signatures_are_refused(keys: sigv4.Keys) -> None:
    cases = [(signed(BODY, secret="wrong"), "SignatureDoesNotMatch"),
             (signed(BODY, key="AKIDNOBODY"), "AuthFailure"),
             (signed(BODY, when=datetime.datetime.now(datetime.timezone.utc)
                     - datetime.timedelta(minutes=6)), "RequestExpired"),
             (signed(BODY, when=datetime.datetime.now(datetime.timezone.utc)
                     + datetime.timedelta(minutes=6)), "RequestExpired")]
    for headers, code in cases:
        with pytest.raises(ApiError) as exc:
            sigv4.verify(keys, "POST", "127.0.0.1:9650", "/", headers, BODY)
        assert exc.value.code == code
    ok = signed(BODY, when=datetime.datetime.now(datetime.timezone.utc)
                - datetime.timedelta(minutes=4))
    assert sigv4.verify(keys, "POST", "127.0.0.1:9650", "/", ok, BODY).access_key == KEY
    other = signed(BODY, key="AKIDOPS", secret="other")
    assert sigv4.verify(keys, "POST", "127.0.0.1:9650", "/", other, BODY).access_key == "AKIDOPS"


def test_a_get_request_signs_its_query_string(keys: sigv4.Keys) -> None:
    query = urlencode({"Action": "DescribeSecurityGroups", "Version": wire.API_VERSION,
                       "GroupId.1": "sg-1"})
    req = AWSRequest(method="GET", url=f"http://127.0.0.1:9650/?{query}")
    SigV4Auth(Credentials(KEY, SECRET), "ec2", "us-east-1").add_auth(req)
    headers = dict(req.headers.items())
    assert sigv4.verify(keys, "GET", "127.0.0.1:9650", f"/?{query}", headers, b"")
    with pytest.raises(ApiError) as exc:
        sigv4.verify(keys, "GET", "127.0.0.1:9650", f"/?{query}&GroupId.2=sg-2", headers, b"")
    assert exc.value.code == "SignatureDoesNotMatch"
    assert dict(parse_qsl(query))["GroupId.1"] == "sg-1"


def test_the_credentials_file_must_be_private_and_is_read_again(tmp_path) -> None:
    path = tmp_path / "credentials"
    path.write_text(f"[a]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    path.chmod(0o644)
    with pytest.raises(sigv4.CredentialsError, match="chmod 600"):
        sigv4.read_credentials(str(path))
    path.chmod(0o600)
    keys = sigv4.Keys(str(path))
    assert keys.secret(KEY) == SECRET
    path.write_text(f"[a]\naws_access_key_id = {KEY}\naws_secret_access_key = rotated\n"
                    "[b]\naws_access_key_id = AKIDNEW\naws_secret_access_key = fresh\n")
    os.utime(path, ns=(1, 10**18))
    assert keys.secret(KEY) == "rotated" and keys.secret("AKIDNEW") == "fresh"
    path.write_text("not a credentials file")  # a broken edit keeps the last good keys
    os.utime(path, ns=(1, 2 * 10**18))
    assert keys.secret("AKIDNEW") == "fresh"
    for text, msg in (("[a]\naws_access_key_id = X\n", "needs"), ("", "no credentials")):
        path.write_text(text)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(sigv4.CredentialsError, match=msg):
            sigv4.read_credentials(str(path))
