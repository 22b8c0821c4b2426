"""SigV4 signatures on EC2 requests, checked against a credentials file.

The file is the AWS CLI's own format (``[profile]`` sections with
``aws_access_key_id`` / ``aws_secret_access_key``), so the same file can
serve the daemon and a client; it must be readable by its owner only (mode
0600 or stricter), and it is read again when it changes.

The signature is recomputed with botocore's signer (canonical request,
string to sign, key derivation) on the request as received, restricted to
the headers the client says it signed, and compared in constant time."""

from __future__ import annotations

import configparser
import datetime
import hmac
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from controller.policy.errors import ApiError

log = logging.getLogger("sgctl")

MAX_SKEW = datetime.timedelta(minutes=5)  # a request signed longer ago (or ahead) is refused
SERVICE = "ec2"
_AUTH = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),"
                   r"\s*Signature=([0-9a-f]{64})\s*\Z")


class CredentialsError(Exception):
    """The credentials file cannot be used (said at start, and on reload)."""


def read_credentials(path: str) -> Dict[str, str]:
    """access key id -> secret, from a file only its owner can read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CredentialsError(f"{path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                               "the secrets; chmod 600 it")
    cp = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f)
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{path}: not a credentials file: {exc}") from None
    keys: Dict[str, str] = {}
    for name in cp.sections():
        sec = cp[name]
        akid, secret = sec.get("aws_access_key_id"), sec.get("aws_secret_access_key")
        if not akid or not secret:
            raise CredentialsError(f"{path}: [{name}] needs aws_access_key_id and "
                                   "aws_secret_access_key")
        if akid in keys:
            raise CredentialsError(f"{path}: access key {akid} is given twice")
        keys[akid] = secret
    if not keys:
        raise CredentialsError(f"{path}: no credentials in it")
    return keys


class Keys:
    """The credentials file, read again when its size or time changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.keys = read_credentials(path)
        self.seen = self._stamp()

    def _stamp(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def secret(self, akid: str) -> Optional[str]:
        with self.lock:
            now = self._stamp()
            if now != self.seen:  # changed: read once; a bad file keeps the old keys
                self.seen = now
                try:
                    self.keys = read_credentials(self.path)
                except CredentialsError as exc:
                    log.warning("EC2 endpoint: keeping the last good credentials: %s", exc)
            return self.keys.get(akid)


@dataclass
class Signed:
    """What a request's signature says about it."""
    access_key: str
    region: str


def verify(keys: Keys, method: str, host: str, path: str, headers: Mapping[str, str],
           body: bytes, now: Optional[datetime.datetime] = None) -> Signed:
    """Raise ApiError (AuthFailure, SignatureDoesNotMatch, RequestExpired)
    unless the request carries a good SigV4 signature of a known key.
    ``path``: as on the request line (with the query string, if any);
    ``headers``: name -> value, any case."""
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization")
    if not auth:
        raise ApiError("AuthFailure", "the request is not signed (no Authorization header)", 401)
    m = _AUTH.match(auth.strip())
    if m is None:
        raise ApiError("AuthFailure", "the Authorization header is not AWS4-HMAC-SHA256 "
                       "Credential=..., SignedHeaders=..., Signature=...", 401)
    credential, signed_names, signature = m.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or parts[3] != SERVICE:
        raise ApiError("AuthFailure", f"credential scope {credential!r} is not "
                       f"<key>/<date>/<region>/{SERVICE}/aws4_request", 401)
    akid, day, region = parts[0], parts[1], parts[2]
    stamp = lower.get("x-amz-date", "")
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)
    except ValueError:
        raise ApiError("AuthFailure", "X-Amz-Date is missing or not YYYYMMDDTHHMMSSZ",
                       401) from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if abs(now - when) > MAX_SKEW:
        raise ApiError("RequestExpired", f"the request was signed at {stamp}, more than "
                       f"{int(MAX_SKEW.total_seconds() // 60)} minutes from this host's "
                       f"time {now:%Y%m%dT%H%M%SZ}", 400)
    if day != stamp[:8]:
        raise ApiError("AuthFailure", "the credential scope's date is not X-Amz-Date's", 401)
    if "x-amz-security-token" in lower:
        raise ApiError("AuthFailure", "temporary credentials (session tokens) are not "
                       "accepted; use a key of the credentials file", 401)
    names = signed_names.split(";")
    if "host" not in names or any(n not in lower for n in names if n != "host"):
        raise ApiError("AuthFailure", "SignedHeaders must include host and name headers "
                       "the request has", 401)
    secret = keys.secret(akid)
    if secret is None:
        raise ApiError("AuthFailure", f"access key {akid} is not known here", 401)
    request = AWSRequest(method=method, url=f"http://{host}{path}", data=body,
                         headers={n: lower[n] if n != "host" else host for n in names})
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(akid, secret), SERVICE, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, signature):
        raise ApiError("SignatureDoesNotMatch", "The request signature we calculated does not "
                       "match the signature you provided. Check your key and signing method.",
                       403)
    return Signed(akid, region)
