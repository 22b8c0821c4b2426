"""End-to-end with the daemon: a real `sgctl daemon` process, changes through
its API and CLI, traffic between namespaces."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from controller.kernel import netlink
from controller.kernel.dataplane import Dataplane
from controller.tools.topology import Topology, sh
from tests.daemonproc import (
    CT_MAX,
    DaemonProc,
    Prober,
    Stream,
    free_port,
    tcp_perm,
    udp_exchanges,
    udp_perm,
    wait_for,
    web_setup,
)
from tests.harness import unique

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


def xdp_prog(dev: str) -> int:
    idx = netlink.ifindex(dev)
    assert idx is not None
    return int(netlink.attached(idx)["xdp_prog_id"])


# --------------------------------------------------------------------------- tests


def test_rules_through_api_and_cli_take_effect(topo: Topology, daemon: DaemonProc) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        gid = web_setup(c, topo, [])
    assert not cli.can_tcp(web.ip4, 80), "a new group has no ingress"
    res = daemon.cli("authorize-ingress", "--group-id", gid, "--protocol", "tcp", "--port", "80",
                     "--cidr", cli.ip4 + "/32", "-o", "json")
    assert res.returncode == 0, res.stderr
    rid = json.loads(res.stdout)["SecurityGroupRules"][0]["SecurityGroupRuleId"]
    assert cli.can_tcp(web.ip4, 80)
    assert not cli.can_tcp(web.ip4, 22)
    dup = daemon.cli("authorize-ingress", "--group-id", gid, "--protocol", "tcp", "--port", "80",
                     "--cidr", cli.ip4 + "/32")
    assert dup.returncode == 2 and "InvalidPermission.Duplicate" in dup.stderr
    res = daemon.cli("revoke-ingress", "--group-id", gid, "--security-group-rule-ids", rid)
    assert res.returncode == 0, res.stderr
    assert not cli.can_tcp(web.ip4, 80), "revoked: new connections are refused"
    table = daemon.cli("describe-security-groups", "--group-ids", gid)
    assert table.returncode == 0 and gid in table.stdout
    status = json.loads(daemon.cli("status", "-o", "json", "--maps").stdout)
    row = status["interfaces"][0]
    assert row["device"] == web.host_dev and row["attached"]["tc_filters"] == 1
    assert status["daemon"]["generation"] >= 4
    maps = {m["map"]: m for m in status["maps"]}
    assert maps["sg_conntrack"]["capacity"] == CT_MAX
    assert maps["sg_endpoints"]["entries"] == 1 and maps["sg_peers4"]["entries"] >= 1
    assert maps["sg_ep_index"]["array"] and not maps["sg_endpoints"]["array"]  # by map type
    table = daemon.cli("status", "--maps").stdout
    assert "sg_conntrack" in table and "CAPACITY" in table


def test_membership_follows_address_on_member_device(topo: Topology, daemon: DaemonProc) -> None:
    """web admits TCP 80 from group sg-m; sg-m's member is a host-mode
    interface whose addresses are watched. An address added to its device
    joins the group (and is let in); removed, it leaves."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    member = unique("sgm")
    extra = "198.18.0.77"
    sh("ip", "link", "add", member, "type", "veth", "peer", "name", member + "p")
    sh("sysctl", "-qw", f"net.ipv4.conf.{topo.bridge}.arp_ignore=1")
    sh("ip", "netns", "exec", cli.ns, "ip", "addr", "add", f"{extra}/24", "dev", "eth0")
    try:
        sh("ip", "link", "set", member, "up")
        daemon.start()
        with daemon.client() as c:
            mgid = c.call("CreateSecurityGroup", {"GroupName": unique("m"),
                                                  "Description": "members"})["GroupId"]
            web_setup(c, topo, [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                                 "UserIdGroupPairs": [{"GroupId": mgid}]}])
            c.call("CreateNetworkInterface", {"Groups": [mgid], "TagSpecifications": [{
                "ResourceType": "network-interface", "Tags": [
                    {"Key": "host-interface", "Value": member},
                    {"Key": "host-interface-mode", "Value": "host"},
                    {"Key": "host-interface-addresses", "Value": "watch"}]}]})

        def can(src: str) -> bool:
            with cli.inside():
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.1)
            try:
                s.bind((src, 0))
                s.connect((web.ip4, 80))
                return True
            except OSError:
                return False
            finally:
                s.close()

        assert not can(extra)
        sh("ip", "addr", "add", f"{extra}/32", "dev", member)
        took = wait_for(lambda: can(extra))
        print(f"address joined the group; first allowed connection after {took * 1000:.0f} ms")
        assert not can(cli.ip4), "only the member's address was added"
        sh("ip", "addr", "del", f"{extra}/32", "dev", member)
        wait_for(lambda: not can(extra))
        assert "re-enforced" in daemon.logs()
    finally:
        sh("ip", "link", "del", member, check=False)
        sh("ip", "netns", "exec", cli.ns, "ip", "addr", "del", f"{extra}/24", "dev", "eth0",
           check=False)


def test_device_appearing_later_is_bound_and_removed_is_cleaned(daemon: DaemonProc) -> None:
    dev = unique("sgl")
    daemon.start()
    with daemon.client() as c:
        c.call("CreateNetworkInterface", {"TagSpecifications": [{
            "ResourceType": "network-interface", "Tags": [{"Key": "host-interface", "Value": dev}]}]})

    def row() -> Dict[str, Any]:
        return dict(json.loads(daemon.cli("status", "-o", "json").stdout)["interfaces"][0])

    assert row()["pending"] is True
    try:
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        wait_for(lambda: netlink.ifindex(dev) is not None and xdp_prog(dev) != 0)
        wait_for(lambda: row()["pending"] is False)
        assert row()["attached"]["tc_filters"] == 1
        assert "after it appeared" in daemon.logs(), "bound by the netlink handler at once"
    finally:
        sh("ip", "link", "del", dev, check=False)
    wait_for(lambda: row()["pending"] is True)
    dp = Dataplane(pin_dir=daemon.pin_dir, ct_max=CT_MAX)
    try:
        assert dp.map("sg_endpoints").keys() == [], "the gone device's endpoint is removed"
    finally:
        dp.close()


def test_no_loss_under_500_policy_updates(topo: Topology, daemon: DaemonProc) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        gid = web_setup(c, topo, [tcp_perm(80, cli.ip4 + "/32"), udp_perm(53, cli.ip4 + "/32")])
        stream = Stream(cli, web.ip4)
        prober = Prober(cli, web.ip4, 9999)
        latencies = []
        new_flows = 0
        try:
            for i in range(500):
                # rules that touch web's policy (and cli's own address) but never
                # allow the stream's nor the prober's ports
                p = tcp_perm(10000 + i // 2, cli.ip4 + "/32")
                action = ("AuthorizeSecurityGroupIngress" if i % 2 == 0
                          else "RevokeSecurityGroupIngress")
                start = time.monotonic()
                c.call(action, {"GroupId": gid, "IpPermissions": [p]})
                latencies.append(time.monotonic() - start)
                if i % 25 == 0:  # new flows are judged by the policy of the moment
                    assert cli.can_tcp(web.ip4, 80), f"new connection refused at update {i}"
                    new_flows += 1
        finally:
            stream.finish()
            prober.finish()
    print(f"500 updates: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms; tcp rounds {stream.tcp_rounds}, "
          f"udp rounds {stream.udp_rounds}, probes {prober.sent}")
    print(json.loads(daemon.cli("status", "-o", "json").stdout)["interfaces"][0]["counters"])
    assert stream.errors == []
    assert stream.udp_lost == 0
    assert stream.tcp_rounds > 100 and stream.udp_rounds > 100, "the streams really ran"
    assert prober.sent > 100 and prober.answered == 0, "denied traffic got through"
    assert new_flows == 20


def test_restart_under_traffic_and_upgrade(topo: Topology, daemon: DaemonProc) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        web_setup(c, topo, [tcp_perm(80, cli.ip4 + "/32"), udp_perm(53, cli.ip4 + "/32")])
    prog = xdp_prog(web.host_dev)
    stream = Stream(cli, web.ip4)
    try:
        time.sleep(0.3)

        def flows() -> List[Dict[str, Any]]:
            res = daemon.cli("conntrack", "list", "--interface", web.host_dev, "-o", "json")
            assert res.returncode == 0, res.stderr
            return [f for f in json.loads(res.stdout) if f["remote"] == cli.ip4]

        before = {(f["protocol"], f["rport"]) for f in flows()}
        assert ("tcp", stream.tcp.getsockname()[1]) in before
        daemon.kill(signal.SIGKILL)
        rounds = stream.tcp_rounds
        time.sleep(0.5)
        assert stream.tcp_rounds > rounds, "enforcement went on without the daemon"
        assert xdp_prog(web.host_dev) == prog
        daemon.start()
        assert xdp_prog(web.host_dev) == prog, "restart adopts the attached program"
        assert before <= {(f["protocol"], f["rport"]) for f in flows()}, "conntrack intact"
        rounds = stream.tcp_rounds
        time.sleep(0.3)
        assert stream.tcp_rounds > rounds

        # upgrade: a different build of the programs replaces the old one on
        # each hook; maps (and connections) stay
        daemon.kill(signal.SIGTERM)
        daemon.start(env={"SGCTL_EXTRA_CFLAGS": "-DSG_BUILD_ID=2"})
        new = xdp_prog(web.host_dev)
        assert new != prog, "the new build is attached"
        pins = [n for n in os.listdir(daemon.pin_dir) if n.startswith("prog_")]
        assert len(pins) == 2, f"old programs unpinned: {pins}"
        rounds = stream.tcp_rounds
        time.sleep(0.3)
        assert stream.tcp_rounds > rounds
        assert before <= {(f["protocol"], f["rport"]) for f in flows()}
        assert cli.can_tcp(web.ip4, 80) and not cli.can_tcp(web.ip4, 22)
    finally:
        stream.finish()
    assert stream.errors == [] and stream.udp_lost == 0


def test_conntrack_list_flush_gc_and_allowance(topo: Topology, daemon: DaemonProc) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        web_setup(c, topo, [udp_perm(53, cli.ip4 + "/32")])
    assert cli.udp_exchange(web.ip4, 53)

    def flows() -> List[Dict[str, Any]]:
        return [f for f in json.loads(daemon.cli("conntrack", "list", "-o", "json").stdout)
                if f["remote"] == cli.ip4]

    assert [f["state"] for f in flows()] == ["established"]
    wait_for(lambda: json.loads(daemon.cli("status", "-o", "json").stdout)
             ["interfaces"][0].get("conntrack_entries") == 1)
    rows = json.loads(daemon.cli("status", "-o", "json").stdout)["interfaces"]
    row = rows[0]
    # by default each bound interface may hold an equal share of half the table half-open;
    # the UDP exchange completed, so none of it is taken
    bound = len([r for r in rows if r["ep_id"]])
    assert row["conntrack_allowance"] == CT_MAX // 2 // bound
    assert row["conntrack_limit"] == (CT_MAX if bound == 1 else CT_MAX // 2)
    assert row["conntrack_allowance_available"] == row["conntrack_allowance"]
    assert row["conntrack_allowance_exceeded"] == 0
    assert row["conntrack_half_open_evicted"] == 0
    # GC: move the datapath clock past the UDP timeout; the daemon's GC removes it
    dp = Dataplane(pin_dir=daemon.pin_dir, ct_max=CT_MAX)
    try:
        from controller.kernel.conntrack import datapath_now

        dp.set_clock(datapath_now(dp) + 3600)
        wait_for(lambda: flows() == [])
        dp.set_clock(0)
    finally:
        dp.close()
    assert "expired" in daemon.logs()
    assert cli.udp_exchange(web.ip4, 53)
    assert len(flows()) == 1
    res = daemon.cli("conntrack", "flush", "--interface", web.host_dev)
    assert res.returncode == 0 and "flushed 1" in res.stdout
    assert flows() == []


def test_daemon_takes_over_a_one_shot_apply(topo: Topology, daemon: DaemonProc) -> None:
    """apply without a daemon, then start one: it enforces that state, detaching nothing."""
    import yaml

    web, cli = topo.instances["web"], topo.instances["cli"]
    path = Path(daemon.state_dir) / "policy.yaml"
    path.write_text(yaml.safe_dump({"sgctl": 1, "groups": {"sg-w": {"name": "w", "ingress": [
        {"proto": "tcp", "ports": 80, "from": cli.ip4 + "/32"}]}}, "interfaces": {
        "eni-w": {"groups": ["sg-w"], "ipv4": [web.ip4], "device": web.host_dev}}}))
    res = daemon.cli("apply", "-f", str(path))
    assert res.returncode == 0 and "through the daemon" not in res.stdout, res.stderr
    prog = xdp_prog(web.host_dev)
    daemon.start()
    assert xdp_prog(web.host_dev) == prog
    assert cli.can_tcp(web.ip4, 80) and not cli.can_tcp(web.ip4, 22)
    with daemon.client() as c:
        rules = c.call("DescribeSecurityGroupRules", {"Filters": [
            {"Name": "group-id", "Values": ["sg-w"]}]})["SecurityGroupRules"]
    assert [r["FromPort"] for r in rules if not r["IsEgress"]] == [80]


def test_metrics_match_traffic(topo: Topology, daemon: DaemonProc) -> None:
    """K UDP exchanges on one flow: the scraped counters move by exactly the
    packets the datapath saw, and agree with the kernel's counters."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    web, cli = topo.instances["web"], topo.instances["cli"]
    port = free_port()
    daemon.start("--metrics-address", f"127.0.0.1:{port}")
    with daemon.client() as c:
        web_setup(c, topo, [udp_perm(53, cli.ip4 + "/32")])
    eni = json.loads(daemon.cli("status", "-o", "json").stdout)["interfaces"][0]["interface"]

    def scrape() -> Dict[tuple, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        out = {}
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def packets(m: Dict[tuple, float], direction: str, reason: str) -> float:
        verdict = "ACCEPT" if reason.startswith(("allow", "pass")) else "REJECT"
        key = ("sgctl_packets_total", tuple(sorted({
            "interface": eni, "device": web.host_dev, "direction": direction,
            "verdict": verdict, "reason": reason}.items())))
        return m.get(key, 0.0)

    before = scrape()
    k = 25
    udp_exchanges(cli, web.ip4, 53, k)
    from controller.service.metrics import CACHE_SECONDS

    time.sleep(CACHE_SECONDS)  # scrapes within a second share one reading of the maps
    assert scrape() == scrape(), "the second scrape is the cached one"
    after = scrape()
    assert packets(after, "ingress", "allow_new") - packets(before, "ingress", "allow_new") == 1
    assert (packets(after, "ingress", "allow_established")
            - packets(before, "ingress", "allow_established")) == k - 1
    assert (packets(after, "egress", "allow_established")
            - packets(before, "egress", "allow_established")) == k
    status = json.loads(daemon.cli("status", "-o", "json").stdout)["interfaces"][0]["counters"]
    assert packets(after, "ingress", "allow_established") == \
        status["ingress/allow_established"]["packets"]
    assert after[("sgctl_policy_generation", ())] >= 3
    assert after[("sgctl_apply_duration_seconds_count", ())] >= 3
    assert after[("sgctl_map_capacity", (("map", "sg_conntrack"),))] == CT_MAX
    wait_for(lambda: scrape()[("sgctl_conntrack_entries", (("interface", eni),))] >= 1)
    m = scrape()
    assert m[("sgctl_conntrack_allowance_available", (("interface", eni),))] <= CT_MAX - 1


def test_rule_hit_counters_follow_traffic_and_survive_updates(topo: Topology,
                                                              daemon: DaemonProc) -> None:
    """K UDP exchanges allowed by one rule: its hits are the connection's
    packets (2K, both directions), another rule's stay 0, and an update that
    keeps the rule keeps its counters."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        gid = web_setup(c, topo, [udp_perm(53, cli.ip4 + "/32"), tcp_perm(80, cli.ip4 + "/32")])
        rules = c.call("DescribeSecurityGroupRules", {"Filters": [
            {"Name": "group-id", "Values": [gid]}]})["SecurityGroupRules"]
        udp_rule = next(r for r in rules if r["IpProtocol"] == "udp")
        tcp_rule = next(r for r in rules if r["IpProtocol"] == "tcp")
        k = 10
        udp_exchanges(cli, web.ip4, 53, k)

        def hits(rid: str) -> Dict[str, Any]:
            got = c.call("DescribeSecurityGroupRules", {"SecurityGroupRuleIds": [rid]})
            return dict(got["SecurityGroupRules"][0]["Hits"])

        h = hits(udp_rule["SecurityGroupRuleId"])
        assert h["Packets"] == 2 * k and h["Bytes"] > 0 and h["LastHit"] is not None
        assert hits(tcp_rule["SecurityGroupRuleId"])["Packets"] == 0
        c.call("AuthorizeSecurityGroupIngress", {"GroupId": gid, "IpPermissions": [
            tcp_perm(8080, cli.ip4 + "/32")]})  # a new policy version keeping the rule
        assert hits(udp_rule["SecurityGroupRuleId"])["Packets"] == 2 * k
    table = daemon.cli("describe-security-group-rules", "--group-id", gid)
    assert table.returncode == 0 and f"Packets={2 * k} " in table.stdout


EXPLAIN_CASES = [
    # (description, protocol, port, expected verdict) from cli to web, ingress
    ("tcp 80 allowed by its rule", "tcp", 80, "ACCEPT"),
    ("tcp 22 no rule", "tcp", 22, "REJECT"),
    ("udp 53 allowed", "udp", 53, "ACCEPT"),
    ("udp 9999 no rule", "udp", 9999, "REJECT"),
    ("icmp echo no rule", "icmp", 0, "REJECT"),
]


def test_explain_agrees_with_traffic_and_reports_a_disagreement(topo: Topology,
                                                                daemon: DaemonProc) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    daemon.start()
    with daemon.client() as c:
        gid = web_setup(c, topo, [tcp_perm(80, cli.ip4 + "/32"), udp_perm(53, cli.ip4 + "/32")])

    def explain(proto: str, port: int) -> subprocess.CompletedProcess:
        return daemon.cli("explain", "--interface", web.host_dev, "--direction", "ingress",
                          "--protocol", proto, "--source", cli.ip4, "--destination", web.ip4,
                          "--port", str(port), "-o", "json")

    for desc, proto, port, want in EXPLAIN_CASES:
        res = explain(proto, port)
        assert res.returncode == 0, (desc, res.stderr)
        out = json.loads(res.stdout)
        assert out["Verdict"] == want and out["Agree"], (desc, out)
        if want == "ACCEPT":
            assert out["Rules"] and out["Rules"][0]["GroupId"] == gid and out["Tracked"]
        if proto == "tcp":
            real = cli.can_tcp(web.ip4, port)
        elif proto == "udp":
            real = cli.udp_exchange(web.ip4, port)
        else:
            real = cli.ping(web.ip4)
        assert real == (want == "ACCEPT"), f"{desc}: real traffic disagrees with explain"
    # explain tracks nothing: no conntrack entry from the probes
    flows = json.loads(daemon.cli("conntrack", "list", "-o", "json").stdout)
    assert all(f["ep_id"] != 1023 for f in flows)
    # inject a disagreement: the kernel loses the policy's prefixes
    dp = Dataplane(pin_dir=daemon.pin_dir, ct_max=CT_MAX)
    try:
        for name in ("sg_peers4", "sg_peers"):
            m = dp.map(name)
            m.delete_many(m.keys())
    finally:
        dp.close()
    res = explain("tcp", 80)
    assert res.returncode == 3 and "DISAGREEMENT" in res.stderr
    assert json.loads(res.stdout)["KernelReason"] == "drop_no_rule"


def test_cli_waits_for_a_starting_daemon(topo: Topology, daemon: DaemonProc) -> None:
    """`sgctl apply` issued while the daemon is still starting goes through
    it (no one-shot change under a starting daemon)."""
    import yaml

    web = topo.instances["web"]
    path = Path(daemon.state_dir) / "policy.yaml"
    path.write_text(yaml.safe_dump({"sgctl": 1, "groups": {"sg-w": {"name": "w"}}, "interfaces": {
        "eni-w": {"groups": ["sg-w"], "ipv4": [web.ip4], "device": web.host_dev}}}))
    daemon.proc = subprocess.Popen([*daemon.base(), "daemon", "--metrics-address", "none"],
                                   cwd=ROOT, stdout=daemon.log, stderr=daemon.log)
    wait_for(lambda: os.path.exists(os.path.join(daemon.state_dir, "daemon.pid")), 30)
    res = daemon.cli("apply", "-f", str(path))
    assert res.returncode == 0 and "through the daemon" in res.stdout, res.stdout + res.stderr


def test_ready_is_signalled_only_once_the_stored_policy_is_enforced(daemon: DaemonProc,
                                                                     tmp_path: Path) -> None:
    """Type=notify: after a "reboot" (the device recreated, no programs on
    it) READY=1 reaches systemd only when the device is filtered again."""
    dev = unique("sgn")
    sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        daemon.start()
        with daemon.client() as c:
            c.call("CreateNetworkInterface", {"TagSpecifications": [{
                "ResourceType": "network-interface",
                "Tags": [{"Key": "host-interface", "Value": dev}]}]})
        wait_for(lambda: xdp_prog(dev) != 0)
        daemon.kill(signal.SIGTERM)
        sh("ip", "link", "del", dev)
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        assert xdp_prog(dev) == 0
        path = str(tmp_path / "notify.sock")
        notify.bind(path)
        notify.settimeout(90)
        daemon.start(env={"NOTIFY_SOCKET": path})
        message = notify.recv(4096).decode()
        assert message.startswith("READY=1") and "enforced on 1 devices" in message, message
        assert xdp_prog(dev) != 0, "ready before the device was filtered"
        daemon.kill(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        notify.close()
        sh("ip", "link", "del", dev, check=False)


def test_systemd_unit_starts_before_the_network() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "packaging" / "sgctl.service")
    assert unit["Unit"]["Before"] == "network-pre.target"
    assert unit["Unit"]["Wants"] == "network-pre.target"
    assert "After" not in unit["Unit"]
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["UMask"] == "0027"
