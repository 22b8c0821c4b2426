"""A hypervisor in miniature: network namespaces as instances, veth pairs
whose host ends sit on a Linux bridge in the root namespace. Addresses from
198.18.0.0/15 and 2001:db8::/32; nothing is routed off the machine."""

from __future__ import annotations

import socket
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional

from pyroute2 import IPRoute
from pyroute2.netns import popns, pushns

XDP_DRV = 4  # XDP_FLAGS_DRV_MODE


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def attach_xdp(dev: str, fd: int) -> None:
    """Program ``fd`` on device ``dev`` (of this namespace) in driver mode;
    a veth takes XDP frames only with a program on its peer."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)[0]
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_DRV)]})


@dataclass
class Instance:
    ns: str
    host_dev: str  # host end, on the bridge
    ip4: str
    ip6: str
    mac: str = ""  # of its eth0 (gives its IPv6 link-local)

    @contextmanager
    def inside(self) -> Iterator[None]:
        pushns(self.ns)
        try:
            yield
        finally:
            popns()

    def ping(self, dst: str, count: int = 1) -> bool:
        cmd = ["ip", "netns", "exec", self.ns, "ping", "-c", str(count), "-W", "1", "-i", "0.2", dst]
        return sh(*cmd, check=False).returncode == 0

    def tcp_connect(self, dst: str, port: int, timeout: float = 1.0) -> Optional[socket.socket]:
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with self.inside():
            s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            return s
        except OSError:
            s.close()
            return None

    def can_tcp(self, dst: str, port: int) -> bool:
        s = self.tcp_connect(dst, port)
        if s is None:
            return False
        try:
            return echo_ok(s)
        finally:
            s.close()

    def udp_exchange(self, dst: str, port: int, timeout: float = 1.0) -> bool:
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with self.inside():
            s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.sendto(b"ping", (dst, port))
            data, _ = s.recvfrom(100)
            return data == b"ping"
        except OSError:
            return False
        finally:
            s.close()


def echo_ok(s: socket.socket, payload: bytes = b"hello") -> bool:
    try:
        s.sendall(payload)
        return s.recv(100) == payload
    except OSError:
        return False


class Servers:
    """TCP and UDP echo servers inside instances, on threads."""

    def __init__(self) -> None:
        self.socks: List[socket.socket] = []
        self.stop = threading.Event()

    def tcp(self, inst: Instance, port: int, v6: bool = False) -> None:
        with inst.inside():
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if v6 else "0.0.0.0", port))
        s.listen(64)
        s.settimeout(0.2)
        self.socks.append(s)

        def conn_loop(c: socket.socket) -> None:
            c.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    data = c.recv(4096)
                    if not data:
                        break
                    c.sendall(data)
                except socket.timeout:
                    continue
                except OSError:
                    break
            c.close()

        def loop() -> None:
            while not self.stop.is_set():
                try:
                    c, _ = s.accept()
                except (socket.timeout, OSError):
                    continue
                threading.Thread(target=conn_loop, args=(c,), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()

    def udp(self, inst: Instance, port: int, v6: bool = False) -> None:
        with inst.inside():
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if v6 else "0.0.0.0", port))
        s.settimeout(0.2)
        self.socks.append(s)

        def loop() -> None:
            while not self.stop.is_set():
                try:
                    data, addr = s.recvfrom(4096)
                    s.sendto(data, addr)
                except (socket.timeout, OSError):
                    continue

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            s.close()


class Topology:
    def __init__(self, tag: str, names: List[str]) -> None:
        self.tag = tag
        self.bridge = f"sgb{tag}"
        self.instances = {}
        self.created_ns: List[str] = []
        self.created_links: List[str] = [self.bridge]
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(names):
            ns = f"sgn{tag}{name}"
            host = f"sgh{tag}{name}"[:15]
            sh("ip", "netns", "add", ns)
            self.created_ns.append(ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.created_links.append(host)
            sh("ip", "link", "set", host, "master", self.bridge)
            sh("ip", "link", "set", host, "up")
            ip4, ip6 = f"198.18.0.{10 * (i + 1)}", f"2001:db8::{10 * (i + 1)}"
            mac = f"02:53:47:00:00:{i + 1:02x}"
            ex = ("ip", "netns", "exec", ns)
            sh(*ex, "ip", "link", "set", "lo", "up")
            sh(*ex, "ip", "link", "set", "eth0", "address", mac)
            sh(*ex, "ip", "addr", "add", f"{ip4}/24", "dev", "eth0")
            sh(*ex, "ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            sh(*ex, "ip", "link", "set", "eth0", "up")
            self.instances[name] = Instance(ns, host, ip4, ip6, mac)

    def close(self) -> None:
        for link in self.created_links:
            sh("ip", "link", "del", link, check=False)
        for ns in self.created_ns:
            sh("ip", "netns", "del", ns, check=False)
