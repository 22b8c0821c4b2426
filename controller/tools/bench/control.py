"""Control-plane timings through a real daemon (python -m controller.bench.control).

- one rule change (Authorize/Revoke alternately) from API call to enforcement
  (the API answers after the kernel maps are switched), median of N, on a
  group of 10 / 1k / 10k rules bound to a device;
- whole-state Apply of 10 ... 100k rules;
- address added to a watched member device -> the kernel program's verdict
  flips, polled with BPF_PROG_TEST_RUN every millisecond.

Everything runs on its own veth pair, pins and socket, removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import boto3
import yaml
from botocore.config import Config
from pyroute2 import IPRoute

from controller.kernel import bpfsys, netlink
from controller.kernel.frames import frame
from controller.policy.evaluator import TCP_SYN, Packet, addr
from controller.policy.formats import load_text
from controller.policy.vocabulary import TAG_DEVICE
from controller.service import api
from controller.tools.bench import on_sigterm
from controller.tools.bench.rulesets import iptables_rules, nft_elements, nft_rules, rules

EC2_KEY, EC2_SECRET = "AKIDSGCTLBENCH", "bench-secret"  # the bench daemon's EC2 endpoint


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Bench:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.dev, self.member = f"sgbc{tag}", f"sgbm{tag}"
        self.tmp = tempfile.mkdtemp(prefix="sgctl-bench-")
        self.pin = f"/sys/fs/bpf/sgbench{tag}"
        self.sock = os.path.join(self.tmp, "api.sock")
        self.base = [sys.executable, "-m", "controller.cli", "--pin-dir", self.pin,
                     "--state-dir", self.tmp, "--socket", self.sock, "--conntrack-max", "65536"]
        for d in (self.dev, self.member):
            _sh("ip", "link", "add", d, "type", "veth", "peer", "name", d + "p")
            _sh("ip", "link", "set", d, "up")
        self.log = open(os.path.join(self.tmp, "daemon.log"), "ab")
        self.creds = os.path.join(self.tmp, "credentials")
        with open(self.creds, "w") as f:
            f.write(f"[bench]\naws_access_key_id = {EC2_KEY}\naws_secret_access_key = {EC2_SECRET}\n")
        os.chmod(self.creds, 0o600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.ec2_port = s.getsockname()[1]
        self.proc = subprocess.Popen([*self.base, "daemon", "--gc-interval", "3600",
                                      "--metrics-address", "none",
                                      "--ec2-endpoint", f"127.0.0.1:{self.ec2_port}",
                                      "--ec2-credentials", self.creds],
                                     stdout=self.log, stderr=self.log)
        while not api.ping(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(open(os.path.join(self.tmp, "daemon.log")).read())
            time.sleep(0.1)
        self.client = api.Client(self.sock, timeout=600)

    def apply(self, ingress: List[Dict[str, Any]], extra: Dict[str, Any]) -> float:
        doc = {"sgctl": 1, "groups": {"sg-bench": {"name": "bench", "ingress": ingress,
                                                   "egress": []},
                                      "sg-m": {"name": "m"}},
               "interfaces": {"eni-bench": {"groups": ["sg-bench"], "ipv4": ["198.18.0.10"],
                                            "device": self.dev}, **extra}}
        start = time.monotonic()
        self.client.call("Apply", {"Document": doc})
        return time.monotonic() - start

    def rule_change(self, n_rules: int, samples: int) -> Dict[str, float]:
        self.apply(rules(n_rules), {})
        perm = {"IpProtocol": "tcp", "FromPort": 7, "ToPort": 7,
                "IpRanges": [{"CidrIp": "198.18.99.0/24"}]}
        times = []
        for i in range(samples):
            action = "AuthorizeSecurityGroupIngress" if i % 2 == 0 else "RevokeSecurityGroupIngress"
            start = time.monotonic()
            self.client.call(action, {"GroupId": "sg-bench", "IpPermissions": [perm]})
            times.append(time.monotonic() - start)
        return {"rules": n_rules, "samples": samples,
                "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}

    def ec2_rule_change(self, n_rules: int, samples: int) -> Dict[str, float]:
        """The same change through the EC2 endpoint with boto3 (SigV4 signing,
        Query encoding, XML answer included), on a group of ``n_rules``."""
        self.apply(rules(n_rules), {})
        c = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{self.ec2_port}",
                         region_name="us-east-1", aws_access_key_id=EC2_KEY,
                         aws_secret_access_key=EC2_SECRET,
                         config=Config(retries={"max_attempts": 1}))
        perm = {"IpProtocol": "tcp", "FromPort": 7, "ToPort": 7,
                "IpRanges": [{"CidrIp": "198.18.99.0/24"}]}
        times = []
        for i in range(samples):
            call = c.authorize_security_group_ingress if i % 2 == 0 \
                else c.revoke_security_group_ingress
            start = time.monotonic()
            call(GroupId="sg-bench", IpPermissions=[perm])
            times.append(time.monotonic() - start)
        return {"rules": n_rules, "samples": samples,
                "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}

    def membership(self, samples: int) -> Dict[str, float]:
        """ip addr add on a watched member -> kernel verdict flips."""
        self.apply([{"proto": "tcp", "ports": 22, "from": "sg-m"}],
                   {"eni-m": {"groups": ["sg-m"], "device": self.member, "mode": "host",
                              "watch_addresses": True}})
        idx = int(open(f"/sys/class/net/{self.dev}/ifindex").read())
        tags = [n for n in os.listdir(self.pin) if n.startswith("prog_tc_")]
        tc = bpfsys.obj_get(os.path.join(self.pin, tags[0]))
        times = []
        try:
            for i in range(samples):
                src = f"198.19.{i // 200}.{i % 200 + 1}"
                pkt = frame(Packet(addr(src), addr("198.18.0.10"), 6, 40000 + i, 22,
                                   tcp_flags=TCP_SYN))
                assert bpfsys.test_run(tc, pkt, idx, xdp=False)[0] != 0, "allowed too early"
                start = time.monotonic()
                _sh("ip", "addr", "add", f"{src}/32", "dev", self.member)
                while bpfsys.test_run(tc, pkt, idx, xdp=False)[0] != 0:  # TC_ACT_OK = 0
                    if time.monotonic() - start > 5:
                        raise RuntimeError("membership never took effect")
                    time.sleep(0.001)
                times.append(time.monotonic() - start)
                _sh("ip", "addr", "del", f"{src}/32", "dev", self.member)
                time.sleep(0.05)
        finally:
            os.close(tc)
        return {"samples": samples, "median_ms": statistics.median(times) * 1000,
                "max_ms": max(times) * 1000}

    def device_appears(self, samples: int) -> Dict[str, Any]:
        """A bound interface's device is created -> both programs attached
        (the tc filter is the last step), polled over netlink; with the
        current rules (binding compiles nothing, so their number does not
        matter). The device is deleted between samples."""

        dev = f"sgba{os.getpid() % 100000}"
        rules_now = self.client.call("DescribeSecurityGroupRules")["SecurityGroupRules"]
        self.client.call("CreateNetworkInterface", {"Groups": ["sg-bench"], "TagSpecifications": [
            {"ResourceType": "network-interface",
             "Tags": [{"Key": TAG_DEVICE, "Value": dev}]}]})
        times = []
        try:
            with IPRoute() as ipr:
                for _ in range(samples):
                    start = time.monotonic()
                    ipr.link("add", ifname=dev, kind="veth", peer=dev + "p")
                    idx = ipr.link_lookup(ifname=dev)[0]
                    while not any(f.get_attr("TCA_KIND") == "bpf" and f["handle"] for f in
                                  ipr.get_filters(idx, parent=netlink.TC_EGRESS_PARENT)):
                        if time.monotonic() - start > 10:
                            raise RuntimeError(f"{dev} was never bound")
                    times.append(time.monotonic() - start)
                    ipr.link("del", index=idx)
                    time.sleep(0.3)  # the reconciler marks it pending again
        finally:
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
        return {"samples": samples, "rules": len(rules_now),
                "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait()
        subprocess.run([*self.base, "reset"], capture_output=True)
        for d in (self.dev, self.member):
            subprocess.run(["ip", "link", "del", d], capture_output=True)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    quick = "--quick" in sys.argv
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))  # clean up on kill, too
    b = Bench()
    out: Dict[str, Any] = {}
    try:
        sizes = (10, 1000) if quick else (10, 1000, 10000)
        out["rule_change"] = []
        for n in sizes:
            out["rule_change"].append(b.rule_change(n, 20 if quick else 100))
            print(out["rule_change"][-1], file=sys.stderr)
        out["apply"] = []
        for n in ((10, 1000) if quick else (10, 1000, 10000, 50000, 100000)):
            out["apply"].append({"rules": n, "seconds": b.apply(rules(n), {})})
            print(out["apply"][-1], file=sys.stderr)
        out["membership"] = b.membership(5 if quick else 50)
    finally:
        b.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def netfilter_times(sizes: List[int], samples: int) -> List[Dict[str, Any]]:
    """The same rule sets through iptables-restore and nft -f (in a scratch
    namespace), and one added rule/element, for comparison."""

    ns = f"sgcp{os.getpid() % 100000}"
    _sh("ip", "netns", "add", ns)
    ex = ("ip", "netns", "exec", ns)

    def timed(cmd: tuple, inp: str = "") -> float:
        start = time.monotonic()
        subprocess.run(cmd, input=inp, text=True, check=True, capture_output=True)
        return time.monotonic() - start

    out = []
    try:
        for n in sizes:
            rs = rules(n)
            subprocess.run((*ex, "iptables", "-F", "INPUT"), capture_output=True)
            ipt = timed((*ex, "iptables-restore", "--noflush"), iptables_rules(rs, "eth0"))
            ipt_change = statistics.median(
                timed((*ex, "iptables", "-I", "INPUT", "2", "-s", "198.18.99.0/24", "-p", "tcp",
                       "--dport", str(7 + i), "-j", "ACCEPT")) for i in range(samples))
            subprocess.run((*ex, "nft", "delete", "table", "inet", "sgbench"), capture_output=True)
            start = time.monotonic()
            timed((*ex, "nft", "-f", "-"), nft_rules("eth0"))
            for cmd in nft_elements(rs, "eth0"):
                timed((*ex, "nft", "-f", "-"), cmd)
            nft = time.monotonic() - start
            nft_change = statistics.median(
                timed((*ex, "nft", "add", "element", "inet", "sgbench", "allow4",
                       f"{{ 198.18.{99 + i % 100}.0/24 . {7 + i} }}")) for i in range(samples))
            out.append({"rules": n, "iptables_s": ipt, "iptables_change_ms": ipt_change * 1000,
                        "nft_s": nft, "nft_change_ms": nft_change * 1000})
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return out


def startup() -> Dict[str, float]:
    """`sgctl apply` on a host with nothing pinned: compile, load, write, attach."""
    tag = f"{os.getpid() % 100000}"
    dev, tmp = f"sgsu{tag}", tempfile.mkdtemp(prefix="sgctl-startup-")
    pin = f"/sys/fs/bpf/sgsu{tag}"
    base = [sys.executable, "-m", "controller.cli", "--pin-dir", pin, "--state-dir", tmp,
            "--conntrack-max", "65536"]
    _sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
    try:
        path = os.path.join(tmp, "p.json")
        with open(path, "w") as f:
            json.dump({"sgctl": 1, "groups": {"sg-a": {"name": "a", "ingress": rules(10)}},
                       "interfaces": {"eni-a": {"groups": ["sg-a"], "device": dev}}}, f)
        start = time.monotonic()
        subprocess.run([*base, "apply", "-f", path], check=True, capture_output=True)
        cold = time.monotonic() - start
        start = time.monotonic()
        subprocess.run([*base, "apply", "-f", path], check=True, capture_output=True)
        warm = time.monotonic() - start
        return {"cold_s": cold, "warm_s": warm}
    finally:
        subprocess.run([*base, "reset"], capture_output=True)
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def yaml_load(sizes: List[int]) -> List[Dict[str, Any]]:
    """A native YAML document of n rules: sgctl's loader (libyaml, bounded)
    against PyYAML's pure-Python SafeLoader on the same text."""

    out = []
    for n in sizes:
        text = yaml.safe_dump({"sgctl": 1, "groups": {"sg-a": {"name": "a",
                                                               "ingress": rules(n)}}})
        start = time.monotonic()
        state = load_text(text)
        ours = time.monotonic() - start
        assert sum(len(g.rules) for g in state.groups.values()) >= n
        start = time.monotonic()
        yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - the reference parse only
        pure = time.monotonic() - start
        out.append({"rules": n, "bytes": len(text), "sgctl_s": ours, "pure_python_parse_s": pure})
    return out


def run(sizes: List[int], samples: int, yaml_sizes: List[int]) -> Dict[str, Any]:
    b = Bench()
    out: Dict[str, Any] = {"rule_change": [], "apply": []}
    try:
        for n in sizes:
            b.apply([], {})
            out["apply"].append({"rules": n, "seconds": b.apply(rules(n), {})})
            out["rule_change"].append(b.rule_change(n, samples))
        out["ec2_rule_change"] = b.ec2_rule_change(max(sizes), samples)
        out["device_appears"] = b.device_appears(max(5, samples // 2))
        out["membership"] = b.membership(max(5, samples // 2))
    finally:
        b.close()
    out["yaml_load"] = yaml_load(yaml_sizes)
    out["netfilter"] = netfilter_times(sizes, max(5, samples // 4))
    out["startup"] = startup()
    return out
