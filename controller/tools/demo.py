"""`make demo`: a hypervisor in miniature, policy applied by the real CLI
through the daemon, changed through the API, enforced across a daemon crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Optional

from controller.service.api import ping as api_ping
from controller.tools.etcd import EtcdProc

NS = {"web": ("sgdemo-nweb", "sgdemo-web", "198.18.0.10"),
      "app": ("sgdemo-napp", "sgdemo-app", "198.18.0.20"),
      "client": ("sgdemo-ncli", "sgdemo-cli", "198.18.0.30")}
BRIDGE = "sgdemo-br"
PIN = "/sys/fs/bpf/sgctl-demo"
STATE = os.environ.get("SGCTL_DEMO_STATE", tempfile.gettempdir() + "/sgctl-demo")
SOCKET = STATE + "/api.sock"
METRICS = "127.0.0.1:9640"

POLICY = textwrap.dedent("""\
    sgctl: 1
    groups:
      sg-web:
        name: web
        ingress:
          - {proto: tcp, ports: 80, from: 0.0.0.0/0, description: http from anywhere}
          - {proto: icmp, type: 8, code: -1, from: sg-app, description: ping from app servers}
      sg-app:
        name: app
        ingress:
          - {proto: tcp, ports: 5432, from: sg-web, description: database from web servers}
        egress:
          - {proto: all, to: 198.18.0.0/24}
    interfaces:
      eni-web:    {groups: [sg-web], ipv4: [198.18.0.10], device: sgdemo-web}
      eni-app:    {groups: [sg-app], ipv4: [198.18.0.20], device: sgdemo-app}
    """)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def ex(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, check=False)


def setup() -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "link", "set", BRIDGE, "up")
    for ns, host, ip in NS.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host, "master", BRIDGE)
        sh("ip", "link", "set", host, "up")
        ex(ns, "ip", "link", "set", "lo", "up")
        ex(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ex(ns, "ip", "link", "set", "eth0", "up")


def cleanup(procs: list) -> None:
    for p in procs:
        p.kill()
        p.wait()
    sgctl("reset", quiet=True)
    for ns, host, _ in NS.values():
        sh("ip", "link", "del", host, check=False)
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def base() -> list:
    return [sys.executable, "-m", "controller.cli", "--pin-dir", PIN, "--state-dir", STATE,
            "--socket", SOCKET, "--conntrack-max", "65536"]


def start_daemon() -> Optional[subprocess.Popen]:
    print("\n$ sgctl daemon &")
    os.makedirs(STATE, exist_ok=True)
    log = open(STATE + "/daemon.log", "ab")
    proc = subprocess.Popen([*base(), "daemon", "--metrics-address", METRICS,
                             "--flow-log", STATE + "/flows.log", "--flow-log-window", "600"],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 60

    while not api_ping(SOCKET):
        if proc.poll() is not None or time.monotonic() > deadline:
            print("demo: the daemon did not start:\n" + open(STATE + "/daemon.log").read())
            return None
        time.sleep(0.1)
    print(f"  serving on {SOCKET} (pid {proc.pid})")
    return proc


def sgctl(*args: str, quiet: bool = False) -> int:
    cmd = [*base(), *args]
    if not quiet:
        print(f"\n$ sgctl {' '.join(args)}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if not quiet:
        print(textwrap.indent((res.stdout + res.stderr).rstrip(), "  "))
    return res.returncode


def server(ns: str, port: int) -> subprocess.Popen:
    code = ("import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('0.0.0.0',{port}));s.listen(8)\n"
            "while True:\n c,_=s.accept();c.sendall(b'ok');c.close()\n")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_listening(ns: str, port: int, seconds: float = 10.0) -> None:
    """A server just started may not listen yet: wait until it does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ex(ns, "ss", "-Hltn", f"sport = :{port}").stdout.strip():
            return
        time.sleep(0.05)


def tcp(src: str, dst: str, port: int) -> bool:
    code = (f"import socket\ns=socket.create_connection(('{NS[dst][2]}',{port}),timeout=1)\n"
            "assert s.recv(2)==b'ok'")
    return ex(NS[src][0], sys.executable, "-c", code).returncode == 0


def ping(src: str, dst: str) -> bool:
    return ex(NS[src][0], "ping", "-c", "1", "-W", "1", NS[dst][2]).returncode == 0


def show(label: str, ok: bool, expect: bool) -> bool:
    mark = "ALLOWED" if ok else "DENIED "
    verdict = "as expected" if ok == expect else "UNEXPECTED"
    print(f"  {label:<42} {mark}  ({verdict})")
    return ok == expect


def observe() -> bool:
    """What was dropped, why, and which rule let a flow in: explain, flow
    logs, metrics."""
    print("\nObservability. Some traffic first:")
    good = show("client -> web tcp/80", tcp("client", "web", 80), True)
    good &= show("client -> web tcp/22", tcp("client", "web", 22), False)
    good &= show("client -> web ping", ping("client", "web"), False)
    print("\nWhy is ssh from the client dropped? (evaluator and kernel program, one packet)")
    good &= sgctl("explain", "--interface", "eni-web", "--protocol", "tcp", "--source",
                  NS["client"][2], "--destination", NS["web"][2], "--port", "22") == 0
    good &= sgctl("explain", "--interface", "eni-web", "--protocol", "tcp", "--source",
                  NS["client"][2], "--destination", NS["web"][2], "--port", "80") == 0
    print("\nFlow logs (AWS VPC Flow Logs v2 records; the window is closed now instead of "
          "after its 600 s):")
    good &= sgctl("flows", "flush") == 0
    good &= sgctl("flows", "tail", "--interface", "eni-web", "--action", "REJECT") == 0
    print(f"\n$ curl -s {METRICS}/metrics | grep eni-web | grep -E 'REJECT|rule_hits'")

    try:
        text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
    except OSError as exc:
        print(f"  (metrics endpoint not reachable: {exc})")
        return good
    for line in text.splitlines():
        if not line.startswith("#") and ("REJECT" in line and "eni-web" in line
                                         or line.startswith("sgctl_rule_hits_total")):
            print("  " + line)
    return good


def fleet_demo() -> bool:
    """Two hosts sharing one etcd, played by two agents on this machine."""
    print("\nMany hosts: one etcd, an agent per host (two agents here, nodes host-a and "
          "host-b, each with its own pins, state and socket)")
    etcd = EtcdProc()
    agents: list = []
    good = True
    try:
        for node in ("host-a", "host-b"):
            state = f"{STATE}-{node}"
            cmd = [sys.executable, "-m", "controller.cli", "--pin-dir", f"{PIN}-{node}",
                   "--state-dir", state, "--socket", f"{state}/api.sock"]
            os.makedirs(state, exist_ok=True)
            log = open(f"{state}/daemon.log", "ab")
            print(f"$ sgctl daemon --datastore etcd://{etcd.endpoint} --node {node} &")
            proc = subprocess.Popen([*cmd, "daemon", "--metrics-address", "none",
                                     "--datastore", f"etcd://{etcd.endpoint}", "--node", node],
                                    stdout=log, stderr=log)
            agents.append((node, cmd, proc))
            deadline = time.monotonic() + 60
            while not api_ping(f"{state}/api.sock"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(open(f"{state}/daemon.log").read()[-2000:])
                    return False
                time.sleep(0.1)

        def on(node: str, *args: str) -> str:
            cmd = next(c for n, c, _ in agents if n == node)
            print(f"\n[{node}]$ sgctl {' '.join(args)}")
            res = subprocess.run([*cmd, *args], capture_output=True, text=True)
            print(textwrap.indent((res.stdout + res.stderr).rstrip(), "  "))
            return res.stdout

        web_g = on("host-a", "create-security-group", "--group-name", "fleet-web",
                   "--description", "web", "-o", "json")
        cli_g = on("host-a", "create-security-group", "--group-name", "fleet-cli",
                   "--description", "clients", "-o", "json")
        web_id, cli_id = (json.loads(web_g)["GroupId"], json.loads(cli_g)["GroupId"])
        on("host-a", "authorize-ingress", "--group-id", web_id, "--protocol", "tcp", "--port",
           "80", "--source-group", cli_id)
        print("\nweb's interface is host-b's (its device is there); the client is a member "
              "on host-a, known to host-b only through etcd:")
        on("host-a", "create-network-interface", "--groups", web_id, "--private-ip",
           NS["web"][2], "--device", NS["web"][1], "--node", "host-b")
        on("host-a", "create-network-interface", "--groups", cli_id, "--private-ip",
           NS["client"][2], "--node", "host-a")
        deadline = time.monotonic() + 10
        while not tcp("client", "web", 80) and time.monotonic() < deadline:
            time.sleep(0.1)
        on("host-b", "status")
        good &= show("client -> web tcp/80 (member of fleet-cli)", tcp("client", "web", 80),
                     True)
        good &= show("app -> web tcp/80 (not a member)", tcp("app", "web", 80), False)
    finally:
        for _, cmd, proc in agents:
            proc.terminate()
            proc.wait()
            subprocess.run([*cmd, "reset"], capture_output=True)
        etcd.close()
    return good


def main() -> int:
    if os.geteuid() != 0:
        print("demo: must run as root", file=sys.stderr)
        return 1
    procs: list = []
    cleanup(procs)  # leftovers of an interrupted run
    good = True
    try:
        setup()
        listeners = [("web", 80), ("web", 22), ("app", 5432), ("client", 8080)]
        procs += [server(NS[name][0], port) for name, port in listeners]
        for name, port in listeners:
            wait_listening(NS[name][0], port)
        print("Three instances on a bridge: web 198.18.0.10, app 198.18.0.20, client 198.18.0.30")
        print("\nBefore any policy, everything flows:")
        good &= show("client -> web tcp/22", tcp("client", "web", 22), True)
        daemon = start_daemon()
        if daemon is None:
            return 1
        procs.append(daemon)
        path = Path(tempfile.mkdtemp()) / "policy.yaml"
        path.write_text(POLICY)
        print("\nThe policy (native YAML):\n" + textwrap.indent(POLICY, "  "))
        if sgctl("apply", "-f", str(path)) != 0:
            return 1
        sgctl("status")
        print("\nTraffic after `sgctl apply` (the kernel enforces, no packet goes to user space):")
        good &= show("client -> web tcp/80 (http from anywhere)", tcp("client", "web", 80), True)
        good &= show("client -> web tcp/22 (no rule)", tcp("client", "web", 22), False)
        good &= show("app -> web ping (icmp from sg-app)", ping("app", "web"), True)
        good &= show("client -> web ping (not a member)", ping("client", "web"), False)
        good &= show("web -> app tcp/5432 (group reference)", tcp("web", "app", 5432), True)
        good &= show("client -> app tcp/5432", tcp("client", "app", 5432), False)
        good &= show("web -> client tcp/8080 (default egress)", tcp("web", "client", 8080), True)
        good &= show("app -> client tcp/8080 (egress to /24)", tcp("app", "client", 8080), True)
        bad = path.with_name("bad.yaml")
        bad.write_text(POLICY.replace("ports: 80,", "ports: 80-99999,"))
        print("\nA bad file is rejected and the old policy stays:")
        sgctl("apply", "-f", str(bad))
        good &= show("client -> web tcp/80", tcp("client", "web", 80), True)
        print("\nA rule added through the API (EC2's AuthorizeSecurityGroupIngress):")
        sgctl("authorize-ingress", "--group-id", "sg-web", "--protocol", "tcp", "--port", "22",
              "--cidr", "198.18.0.30/32", "--description", "ssh from the client")
        good &= show("client -> web tcp/22", tcp("client", "web", 22), True)
        sgctl("describe-security-group-rules", "--group-id", "sg-web")
        sgctl("revoke-ingress", "--group-id", "sg-web", "--protocol", "tcp", "--port", "22",
              "--cidr", "198.18.0.30/32")
        good &= show("client -> web tcp/22 (revoked)", tcp("client", "web", 22), False)
        print("\nThe daemon crashes (kill -9); enforcement does not depend on it:")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        procs.remove(daemon)
        good &= show("client -> web tcp/80", tcp("client", "web", 80), True)
        good &= show("client -> web tcp/22", tcp("client", "web", 22), False)
        daemon = start_daemon()
        if daemon is None:
            return 1
        procs.append(daemon)
        print("  (it adopted the pinned maps and attached programs: nothing was detached)")
        sgctl("status")
        good &= observe()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        procs.remove(daemon)
        sgctl("reset", quiet=True)  # the single host's pins go: the fleet's agents take over
        good &= fleet_demo()
    finally:
        cleanup(procs)
        print("\ncleaned up: daemon, namespaces, bridge, pins")
    print("demo " + ("passed" if good else "FAILED"))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
