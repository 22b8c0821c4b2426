"""Shared fixtures: every test gets its own devices, pins and namespaces,
removed even when it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Iterator, List

import pytest

from controller.tools.topology import Servers, Topology
from tests.daemonproc import DaemonProc
from tests.harness import KERNEL_CT_MAX, KernelRunner, unique


def _root_and_bpf() -> bool:
    return os.geteuid() == 0 and os.path.exists("/sys/fs/bpf")


@pytest.fixture
def test_devs() -> Iterator[List[str]]:
    """Two veth devices in the root namespace (no addresses, no routes);
    this kernel has no dummy driver."""
    names = [unique("sgd"), unique("sgd")]
    try:
        for n in names:
            subprocess.run(["ip", "link", "add", n, "type", "veth", "peer", "name", n + "p"],
                           check=True)
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        yield names
    finally:
        for n in names:
            subprocess.run(["ip", "link", "del", n], stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def _kernel_session() -> Iterator[KernelRunner]:
    """One compiled program pair for the whole run (compiling takes seconds)."""
    if not _root_and_bpf():
        pytest.fail("kernel tests need root and bpffs (run `make test`)")
    tmp = tempfile.mkdtemp(prefix="sgctl-test-")
    pin_dir = f"/sys/fs/bpf/{unique('sgt')}"
    runner = None
    try:
        runner = KernelRunner(pin_dir, tmp, ct_max=KERNEL_CT_MAX)
        yield runner
    finally:
        if runner is not None:
            runner.close()
        shutil.rmtree(pin_dir, ignore_errors=True)  # also when the build failed
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def kernel(_kernel_session: KernelRunner) -> Iterator[KernelRunner]:
    """The session's programs with empty conntrack, fragments and a frozen clock."""
    _kernel_session.flush()
    _kernel_session.set_clock(1000)
    yield _kernel_session


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology(unique("")[-5:], ["web", "cli"])
    servers = Servers()
    try:
        web = t.instances["web"]
        for port in (22, 80, 8080):
            servers.tcp(web, port)
        servers.udp(web, 53)
        servers.udp(web, 9999)
        yield t
    finally:
        servers.close()
        t.close()


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    d = DaemonProc()
    try:
        yield d
    finally:
        d.close()
