"""The fleet on etcd: how fast a write on one agent changes another agent's
kernel verdict, and how one agent's work grows with the fleet (a simulated
fleet written straight into etcd: 1k/10k/100k interfaces, no devices).

    python -m controller.tools.bench.fleet sync ENDPOINT PREFIX NODE
is the measured agent of the simulation, in a process of its own so that
its peak memory is its own."""

from __future__ import annotations

import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

from controller.policy.formats import load_document
from controller.policy.formats.keyspace import encode
from controller.policy.incremental import Compiler
from controller.reconcile.applied import Applied
from controller.reconcile.plan import plan
from controller.service import api
from controller.service.etcdstore import EtcdStore
from controller.service.fleet import EtcdConfig, Fleet
from controller.tools.etcd import EtcdProc

PROBE_DEV = "sgbfleet0"


class Agent:
    """One `sgctl daemon` on the fleet's etcd, with its own pins and dirs."""

    def __init__(self, etcd: EtcdProc, prefix: str, node: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"sgctl-fleet-{node}-")
        self.pin = f"/sys/fs/bpf/sgbf{os.getpid()}{node}"
        self.socket = os.path.join(self.tmp, "api.sock")
        base = [sys.executable, "-m", "controller.cli", "--pin-dir", self.pin, "--state-dir",
                self.tmp, "--socket", self.socket]
        self.base = base
        self.log = open(os.path.join(self.tmp, "log"), "ab")
        self.proc = subprocess.Popen(
            [*base, "daemon", "--metrics-address", "none", "--datastore",
             f"etcd://{etcd.endpoint}", "--etcd-prefix", prefix, "--node", node],
            stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 120
        while not api.ping(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(open(os.path.join(self.tmp, "log")).read()[-2000:])
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        subprocess.run([*self.base, "reset"], capture_output=True)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def propagation(samples: int) -> Dict[str, Any]:
    """A rule authorised through agent A, until agent B's kernel lets the
    packet it allows in (B's `explain`: the loaded program's verdict)."""
    etcd = EtcdProc()
    agents: List[Agent] = []
    subprocess.run(["ip", "link", "add", PROBE_DEV, "type", "veth", "peer", "name",
                    PROBE_DEV + "p"], check=True)
    try:
        agents = [Agent(etcd, "/bench/", "a"), Agent(etcd, "/bench/", "b")]
        with api.Client(agents[0].socket) as wa, api.Client(agents[1].socket) as rb:
            gid = wa.call("CreateSecurityGroup", {"GroupName": "g", "Description": "g"})["GroupId"]
            wa.call("CreateNetworkInterface", {
                "Groups": [gid], "PrivateIpAddress": "198.18.0.10", "Node": "b",
                "TagSpecifications": [{"ResourceType": "network-interface", "Tags": [
                    {"Key": "host-interface", "Value": PROBE_DEV},
                    {"Key": "host-interface-mode", "Value": "host"}]}]})
            times = []
            for i in range(samples):
                q = {"NetworkInterfaceId": PROBE_DEV, "Direction": "ingress", "Protocol": "tcp",
                     "Source": "198.18.5.5", "Destination": "198.18.0.10", "Port": 2000 + i}
                deadline = time.monotonic() + 30
                while _verdict(rb, q) != "drop_no_rule":  # B has the interface bound
                    if time.monotonic() > deadline:
                        raise RuntimeError("agent b never bound the probe interface")
                    time.sleep(0.01)
                start = time.monotonic()
                wa.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
                    {"IpProtocol": "tcp", "FromPort": 2000 + i, "ToPort": 2000 + i,
                     "IpRanges": [{"CidrIp": "198.18.5.0/24"}]}]})
                while _verdict(rb, q) != "allow_new":
                    if time.monotonic() - start > 10:
                        raise RuntimeError("the change never reached agent b")
                times.append((time.monotonic() - start) * 1000)
        return {"samples": len(times), "median_ms": statistics.median(times),
                "max_ms": max(times), "all_ms": times}
    finally:
        for a in agents:
            a.close()
        subprocess.run(["ip", "link", "del", PROBE_DEV], capture_output=True)
        etcd.close()


def _verdict(c: api.Client, q: Dict[str, Any]) -> str:
    try:
        return str(c.call("Explain", q)["KernelReason"])
    except api.ApiError:
        return "unbound"


def fleet_doc(interfaces: int) -> Dict[str, Any]:
    """``interfaces`` members in interfaces/10 groups on interfaces/100 nodes;
    each group allows SSH from the next group and HTTPS from a CIDR."""
    ngroups, nnodes = max(1, interfaces // 10), max(1, interfaces // 100)
    groups = {f"sg-{g:08x}": {"name": f"g{g}", "ingress": [
        {"proto": "tcp", "ports": 22, "from": f"sg-{(g + 1) % ngroups:08x}"},
        {"proto": "tcp", "ports": 443, "from": f"10.{g % 256}.0.0/16"}]} for g in range(ngroups)}
    enis = {f"eni-{i:08x}": {"groups": [f"sg-{i % ngroups:08x}"], "node": f"node-{i % nnodes}",
                             "device": f"v{i // nnodes}",
                             "ipv4": [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"]}
            for i in range(interfaces)}
    return {"sgctl": 1, "groups": groups, "interfaces": enis,
            "settings": {"max_rules_per_interface": 100000}}


POPULATE_OPS = 4096  # puts per transaction when the bench fills etcd (its etcd allows 100k)


def _write(store: EtcdStore, kvs: Dict[str, bytes]) -> None:
    """Fill etcd with a fleet (the bench's set-up, in large transactions)."""
    items = list(kvs.items())
    for i in range(0, len(items), POPULATE_OPS):
        store._post("/kv/txn", {"success": [
            {"request_put": {"key": base64.b64encode(k.encode()).decode(),
                             "value": base64.b64encode(v).decode()}}
            for k, v in items[i:i + POPULATE_OPS]]})


def simulate(sizes: List[int]) -> List[Dict[str, Any]]:
    out = []
    for n in sizes:
        etcd = EtcdProc()
        try:
            store = EtcdStore([("127.0.0.1", etcd.port)], "/sim/", timeout=60)
            start = time.monotonic()
            _write(store, encode(load_document(fleet_doc(n)), "/sim/"))
            written = time.monotonic() - start
            res = subprocess.run([sys.executable, "-m", "controller.tools.bench.fleet", "sync",
                                  etcd.endpoint, "/sim/", "node-0"],
                                 capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            row = {"interfaces": n, "groups": max(1, n // 10), "nodes": max(1, n // 100),
                   "write_s": written, **json.loads(res.stdout), **store.stats()}
            out.append(row)
            print(row, file=sys.stderr)
        finally:
            etcd.close()
    return out


def sync_agent(endpoint: str, prefix: str, node: str) -> Dict[str, Any]:
    """The measured agent: full sync (read, decode, validate, plan its
    node's interfaces), then one member's address changed in etcd until it
    has planned again (patch, validate, plan). No kernel: what an agent
    computes."""
    host, port = endpoint.rsplit(":", 1)
    planned = threading.Event()
    bound: List[int] = []

    compiler = Compiler()  # as the reconciler's: each plan from the last one's compile

    def on_state(state: Any, revision: int) -> None:
        p = plan(state.for_node(node), {}, Applied(), missing_ok=True, compiler=compiler)
        bound.append(len(p.pending))
        planned.set()

    fleet = Fleet(EtcdConfig([(host, int(port))], prefix), node, on_state)
    fleet.store.timeout = 300
    start = time.monotonic()
    assert fleet.sync(), "etcd unreachable"
    sync_s = time.monotonic() - start
    rss = peak_rss()
    stopping = threading.Event()
    follower = threading.Thread(target=fleet.run, args=(stopping,), daemon=True)
    follower.start()
    planned.clear()
    key = next(k for k in sorted(fleet.kvs) if "/interfaces/" in k)
    doc = json.loads(fleet.kvs[key])
    doc["ipv4"] = ["198.19.0.1"]
    time.sleep(0.5)  # the watch is open
    start = time.monotonic()
    fleet.store.put_raw(key[len(prefix):], json.dumps(doc, sort_keys=True).encode())
    planned.wait(300)
    change_s = time.monotonic() - start
    stopping.set()
    return {"sync_s": sync_s, "rss_bytes": rss, "change_s": change_s,
            "bound_here": bound[0] if bound else 0}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since exec, unlike
    ru_maxrss, which keeps the forking parent's)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(samples: int, sizes: List[int]) -> Dict[str, Any]:
    return {"propagation": propagation(samples), "simulation": simulate(sizes)}


if __name__ == "__main__" and sys.argv[1:2] == ["sync"]:
    print(json.dumps(sync_agent(*sys.argv[2:5])))
