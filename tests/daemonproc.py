"""A real `sgctl daemon` for tests: its own pins, state directory and
socket (DaemonProc; fixtures `topo` and `daemon` in conftest), and helpers to set up
groups and drive traffic through it."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from controller.service import api
from controller.service.api import Client
from controller.tools.topology import Instance, Topology, sh
from tests.harness import unique

ROOT = Path(__file__).resolve().parent.parent
CT_MAX = 65536


class DaemonProc:
    """One `sgctl daemon` with its own pins, state directory and socket."""

    def __init__(self) -> None:
        self.pin_dir = f"/sys/fs/bpf/{unique('sgdm')}"
        self.state_dir = tempfile.mkdtemp(prefix="sgctl-daemon-")
        self.socket = os.path.join(self.state_dir, "api.sock")
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(os.path.join(self.state_dir, "daemon.log"), "ab")

    def base(self) -> List[str]:
        return [sys.executable, "-m", "controller.cli", "--pin-dir", self.pin_dir,
                "--state-dir", self.state_dir, "--socket", self.socket,
                "--conntrack-max", str(CT_MAX)]

    def start(self, *flags: str, env: Optional[Dict[str, str]] = None) -> None:
        if "--metrics-address" not in flags:
            flags = (*flags, "--metrics-address", "none")
        self.proc = subprocess.Popen([*self.base(), "daemon", "--gc-interval", "0.3", *flags],
                                     cwd=ROOT, stdout=self.log, stderr=self.log,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while not api.ping(self.socket):
            assert self.proc.poll() is None, f"daemon exited: {self.logs()}"
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def logs(self) -> str:
        return Path(self.state_dir, "daemon.log").read_text()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base(), *args], capture_output=True, text=True, cwd=ROOT)

    def client(self) -> Client:
        return Client(self.socket)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        self.cli("reset")
        self.log.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

KEY, SECRET = "AKIDSGCTLTESTKEY", "test/secret+key"
REGION = "us-east-1"


class Ec2Daemon:
    """A daemon with its EC2 endpoint, and clients for it."""

    def __init__(self, daemon: DaemonProc, tls: bool = False, *extra: str) -> None:
        self.daemon = daemon
        self.creds = os.path.join(daemon.state_dir, "credentials")
        with open(self.creds, "w") as f:
            f.write(f"[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
        os.chmod(self.creds, 0o600)
        self.port = free_port()
        flags = ["--ec2-endpoint", f"127.0.0.1:{self.port}", "--ec2-credentials", self.creds]
        self.scheme = "http"
        if tls:
            cert, key = (os.path.join(daemon.state_dir, n) for n in ("cert.pem", "key.pem"))
            sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
               "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
               "-keyout", key, "-out", cert)
            flags += ["--ec2-tls-cert", cert, "--ec2-tls-key", key]
            self.scheme, self.ca = "https", cert
        daemon.start(*flags, *extra)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"

    def client(self, secret: str = SECRET, key: str = KEY) -> Any:
        return boto3.client("ec2", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            verify=getattr(self, "ca", None),
                            config=Config(retries={"max_attempts": 1}))

    def raw(self, method: str, body: bytes = b"", query: str = "",
            headers: Dict[str, str] | None = None, sign: bool = True) -> tuple:
        """One request by hand: (status, XML text)."""
        hdrs = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                **(headers or {})}
        path = "/" + (f"?{query}" if query else "")
        if sign:
            req = AWSRequest(method=method, url=f"http://127.0.0.1:{self.port}{path}",
                             data=body, headers=hdrs)
            SigV4Auth(Credentials(KEY, SECRET), "ec2", REGION).add_auth(req)
            hdrs = dict(req.headers.items())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body or None, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def aws(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": self.creds,
               "AWS_CONFIG_FILE": os.devnull, "AWS_DEFAULT_REGION": REGION,
               "AWS_MAX_ATTEMPTS": "1"}
        env.pop("AWS_PROFILE", None)
        return subprocess.run([sys.executable, "-m", "awscli", "ec2", *args, "--endpoint-url",
                               self.url, "--output", "json"], capture_output=True, text=True,
                              env=env, timeout=60)


def wait_for(cond: Callable[[], bool], seconds: float = 5.0) -> float:
    """Seconds until ``cond()`` held; fails after ``seconds``."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < seconds, "condition never held"
        time.sleep(0.02)
    return time.monotonic() - start


def web_setup(c: Client, topo: Topology, ingress: List[Dict[str, Any]]) -> str:
    """Group for web with ``ingress`` permissions, web's interface bound to it."""
    web = topo.instances["web"]
    gid = c.call("CreateSecurityGroup", {"GroupName": unique("web"),
                                         "Description": "web"})["GroupId"]
    if ingress:
        c.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": ingress})
    c.call("CreateNetworkInterface", {
        "Groups": [gid], "PrivateIpAddress": web.ip4,
        "Ipv6Addresses": [{"Ipv6Address": web.ip6}], "MacAddress": web.mac,
        "TagSpecifications": [{"ResourceType": "network-interface", "Tags": [
            {"Key": "host-interface", "Value": web.host_dev}]}]})
    return str(gid)


def tcp_perm(port: int, cidr: str) -> Dict[str, Any]:
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}


def udp_perm(port: int, cidr: str) -> Dict[str, Any]:
    return {"IpProtocol": "udp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}

def udp_exchanges(inst: Instance, dst: str, port: int, k: int) -> None:
    """k datagrams on one flow (one socket), each echoed back."""
    with inst.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        for i in range(k):
            s.sendto(b"%d" % i, (dst, port))
            assert s.recvfrom(64)[0] == b"%d" % i
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stream:
    """An established TCP echo stream and a UDP ping-pong, each on a thread,
    counting every byte/datagram that did not come back."""

    def __init__(self, inst: Instance, dst: str, tcp_port: int = 80, udp_port: int = 53) -> None:
        self.stop = threading.Event()
        self.errors: List[str] = []
        self.tcp_rounds = self.udp_rounds = self.udp_lost = 0
        sock = inst.tcp_connect(dst, tcp_port, timeout=2.0)
        assert sock is not None, "stream's TCP connection could not be opened"
        self.tcp = sock
        with inst.inside():
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.settimeout(1.0)
        self.dst, self.udp_port = dst, udp_port
        self.threads = [threading.Thread(target=self._tcp_loop, daemon=True),
                        threading.Thread(target=self._udp_loop, daemon=True)]
        for t in self.threads:
            t.start()

    def _tcp_loop(self) -> None:
        payload = b"x" * 1000
        while not self.stop.is_set():
            try:
                self.tcp.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = self.tcp.recv(len(payload) - len(got))
                    if not chunk:
                        raise OSError("connection closed")
                    got += chunk
                self.tcp_rounds += 1
            except OSError as exc:
                self.errors.append(f"tcp: {exc}")
                return

    def _udp_loop(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            msg = seq.to_bytes(8, "big")
            self.udp.sendto(msg, (self.dst, self.udp_port))
            try:
                while True:  # skip late echoes of earlier datagrams
                    data, _ = self.udp.recvfrom(64)
                    if data == msg:
                        break
                self.udp_rounds += 1
            except socket.timeout:
                self.udp_lost += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self.tcp.close()
        self.udp.close()


class Prober:
    """Denied traffic sent all along: UDP to a port no rule allows. Any
    answer means a denied packet got through."""

    def __init__(self, inst: Instance, dst: str, port: int) -> None:
        self.stop = threading.Event()
        self.sent = self.answered = 0
        with inst.inside():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.01)
        self.thread = threading.Thread(target=self._loop, args=(dst, port), daemon=True)
        self.thread.start()

    def _loop(self, dst: str, port: int) -> None:
        while not self.stop.is_set():
            self.sock.sendto(b"probe", (dst, port))
            self.sent += 1
            try:
                self.sock.recvfrom(64)
                self.answered += 1
            except socket.timeout:
                pass

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
