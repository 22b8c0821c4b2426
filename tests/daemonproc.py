"""A real `sgctl daemon` for tests: its own pins, state directory and
socket (DaemonProc; fixtures `topo` and `daemon` in conftest), and helpers to set up
groups and drive traffic through it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from controller.service import api
from controller.service.api import Client
from tests.harness import unique
from tests.topology import Instance, Topology

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
