"""A private etcd on 127.0.0.1 for the tests, the bench and the demo: Debian's
etcd-server on free ports with a temporary data dir, stopped and removed even
when the caller fails."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

import requests

# a whole-state apply is one transaction: etcd's defaults (128 operations,
# 1.5 MiB) hold a few hundred objects; the README says how to raise them
LIMITS = ["--max-txn-ops", "100000", "--max-request-bytes", str(64 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdProc:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sgctl-etcd-")
        self.port, self.peer = free_port(), free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cmd(self) -> List[str]:
        url, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        return ["etcd", "--name", "t", "--data-dir", self.dir, "--listen-client-urls", url,
                "--advertise-client-urls", url, "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
                "--log-level", "error", *LIMITS]

    def start(self) -> None:
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(self.cmd(), stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://{self.endpoint}/health", timeout=1).ok:
                    return
            except requests.exceptions.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not start: {open(os.path.join(self.dir, 'etcd.log')).read()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
