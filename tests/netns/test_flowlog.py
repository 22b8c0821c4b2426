"""Flow logs: AWS VPC Flow Logs records from a real daemon, field
by field, for accepted and rejected TCP, UDP and ICMP flows, in the default
and a custom format, and SKIPDATA when an event flood meets the datapath's
rate limit.

Accepted flows are checked against an independent count: an AF_PACKET
socket on the instance's host device sees every frame the datapath let
through, both ways. Rejected packets never reach it; for those the test
sends an exact number (UDP datagrams, raw ICMP, single SYNs)."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.service.flowformat import FlowLogError, parse_format
from controller.tools.topology import Instance, Topology, echo_ok, sh
from tests.daemonproc import ROOT, DaemonProc, free_port, tcp_perm, udp_exchanges, udp_perm, web_setup
from tests.harness import unique

pytestmark = pytest.mark.netns
V2 = ["version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport",
      "protocol", "packets", "bytes", "start", "end", "action", "log-status"]
CUSTOM = ["version", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport", "protocol",
          "packets", "bytes", "action", "log-status", "tcp-flags", "type", "pkt-srcaddr",
          "pkt-dstaddr", "flow-direction", "reject-reason", "rule-id", "group-id", "interface",
          "vpc-id"]
ETH_P_ALL = 0x0003

Tuple5 = Tuple[str, str, int, int, int]  # src, dst, sport, dport, proto


class Sniffer:
    """IPv4 packets and IP bytes per 5-tuple seen on one device (root namespace)."""

    def __init__(self, dev: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.2)
        self.counts: Dict[Tuple5, List[int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl, tot, proto = (ip[0] & 0xF) * 4, struct.unpack("!H", ip[2:4])[0], ip[9]
            src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
            sport = dport = 0
            if proto in (6, 17):
                sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
            c = self.counts.setdefault((src, dst, sport, dport, proto), [0, 0])
            c[0] += 1
            c[1] += tot

    def close(self) -> Dict[Tuple5, List[int]]:
        time.sleep(0.3)  # the last frames
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return self.counts


def icmp_send(inst: Instance, dst: str, icmp_type: int, n: int) -> None:
    """n ICMP messages of ``icmp_type`` (8 bytes of header, 8 of payload)."""
    with inst.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        for i in range(n):
            body = struct.pack("!BBHHH", icmp_type, 0, 0, 0x4242, i) + b"sgctl-ts"
            csum = sum(struct.unpack("!8H", body))
            csum = (csum >> 16) + (csum & 0xFFFF)
            csum = ~(csum + (csum >> 16)) & 0xFFFF
            s.sendto(body[:2] + struct.pack("!H", csum) + body[4:], (dst, 0))
    finally:
        s.close()


def udp_send(inst: Instance, dst: str, port: int, n: int, size: int = 10) -> int:
    """n datagrams from one socket; returns its source port."""
    with inst.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("0.0.0.0", 0))
        for _ in range(n):
            s.sendto(b"x" * size, (dst, port))
        return int(s.getsockname()[1])
    finally:
        s.close()


def one_syn(inst: Instance, dst: str, port: int) -> int:
    """A connect that gives up before the first retransmission: one SYN."""
    with inst.inside():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", 0))
        s.settimeout(0.5)
        try:
            s.connect((dst, port))
        except OSError:
            pass
        else:
            raise AssertionError(f"{dst}:{port} answered")
        return int(s.getsockname()[1])
    finally:
        s.close()


def flush_records(d: DaemonProc, path: Path, fields: List[str], json_lines: bool = False
                  ) -> List[Dict[str, str]]:
    """Close the window; the file's records (all of them so far) by field."""
    with d.client() as c:
        c.call("FlushFlowLogs", {})
    out = []
    for line in path.read_text().splitlines():
        if json_lines:
            out.append({k: "-" if v is None else str(v) for k, v in json.loads(line).items()})
        else:
            values = line.split(" ")
            assert len(values) == len(fields), line
            out.append(dict(zip(fields, values)))
    return out


def find(records: List[Dict[str, str]], **match: Any) -> Dict[str, str]:
    got = [r for r in records if all(r[k.replace("_", "-")] == str(v) for k, v in match.items())]
    assert len(got) == 1, f"{match}: {len(got)} records in {records}"
    return got[0]


def run_traffic(topo: Topology, c: Any) -> Dict[str, Any]:
    web, cli = topo.instances["web"], topo.instances["cli"]
    gid = web_setup(c, topo, [tcp_perm(80, cli.ip4 + "/32"), udp_perm(53, cli.ip4 + "/32"),
                              {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1,
                               "IpRanges": [{"CidrIp": cli.ip4 + "/32", "Description": "ping"}]},
                              {"IpProtocol": "icmpv6", "FromPort": 128, "ToPort": -1,
                               "Ipv6Ranges": [{"CidrIpv6": cli.ip6 + "/128"}]}])
    rules = {(r["IpProtocol"], r["FromPort"]): r["SecurityGroupRuleId"] for r in c.call(
        "DescribeSecurityGroupRules", {"Filters": [{"Name": "group-id", "Values": [gid]}]}
    )["SecurityGroupRules"] if not r["IsEgress"]}
    egress_rule = [r["SecurityGroupRuleId"] for r in c.call(
        "DescribeSecurityGroupRules", {"Filters": [{"Name": "group-id", "Values": [gid]}]}
    )["SecurityGroupRules"] if r["IsEgress"] and r.get("CidrIpv4") == "0.0.0.0/0"][0]
    t0 = int(time.time())  # before the flush: the window (and a record in it) starts after
    c.call("FlushFlowLogs", {})  # the set-up's own packets (none expected) in another window
    sniff = Sniffer(web.host_dev)
    s = cli.tcp_connect(web.ip4, 80)
    assert s is not None and echo_ok(s, b"hello flow logs")
    tcp_port = s.getsockname()[1]
    s.close()
    udp_exchanges(cli, web.ip4, 53, 4)
    assert cli.ping(web.ip4, count=3)
    assert cli.ping(web.ip6, count=3)
    rej_syn = one_syn(cli, web.ip4, 22)
    rej_udp = udp_send(cli, web.ip4, 9999, 5, size=100)
    icmp_send(cli, web.ip4, 13, 2)
    time.sleep(0.5)  # the FINs of the TCP connection
    seen = sniff.close()
    return {"gid": gid, "rules": rules, "egress_rule": egress_rule, "t0": t0,
            "t1": int(time.time()) + 1, "tcp_port": tcp_port,
            "rej_syn": rej_syn, "rej_udp": rej_udp, "seen": seen}


def flow_of(seen: Dict[Tuple5, List[int]], src: str, dst: str, proto: int, sport: int = 0,
            dport: int = 0) -> Tuple[int, int]:
    """Packets and IP bytes the sniffer saw of one flow (sport 0: any)."""
    pk = by = 0
    for (s, d, sp, dp, p), (n, b) in seen.items():
        if (s, d, p) == (src, dst, proto) and dp == dport and (not sport or sp == sport):
            pk, by = pk + n, by + b
    return pk, by


def test_default_format_records_field_by_field(topo: Topology, daemon: DaemonProc,
                                               tmp_path: Path) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.log"
    daemon.start("--flow-log", str(log), "--flow-log-window", "600",
                 "--flow-log-account-id", "123456789012")
    assert log.stat().st_mode & 0o777 == 0o640, "flow records are not for every local user"
    with daemon.client() as c:
        t = run_traffic(topo, c)
        eni = c.call("DescribeNetworkInterfaces", {})["NetworkInterfaces"][0]["NetworkInterfaceId"]
    log.write_text("")  # only this window's records from here on
    records = flush_records(daemon, log, V2)
    ok = [r for r in records if r["log-status"] == "OK" and ":" not in r["srcaddr"]]
    for r in ok:
        assert r["version"] == "2" and r["account-id"] == "123456789012"
        assert r["interface-id"] == eni
        assert t["t0"] <= int(r["start"]) <= int(r["end"]) <= t["t1"], r
    seen = t["seen"]

    # accepted TCP: each direction as the sniffer counted it
    tcp_in = find(ok, srcaddr=cli.ip4, dstaddr=web.ip4, srcport=t["tcp_port"], dstport=80,
                  protocol=6)
    tcp_out = find(ok, srcaddr=web.ip4, dstaddr=cli.ip4, srcport=80, dstport=t["tcp_port"],
                   protocol=6)
    for rec, flow in ((tcp_in, (cli.ip4, web.ip4, 6, t["tcp_port"], 80)),
                      (tcp_out, (web.ip4, cli.ip4, 6, 80, t["tcp_port"]))):
        pk, by = flow_of(seen, *flow)
        assert pk >= 4 and (rec["packets"], rec["bytes"]) == (str(pk), str(by)), (rec, pk, by)
        assert rec["action"] == "ACCEPT"
    # accepted UDP: 4 exchanges of one socket, both ways (payload "0".."3": 29 bytes each)
    udp_in = [r for r in ok if r["protocol"] == "17" and r["dstport"] == "53"]
    assert len(udp_in) == 1 and (udp_in[0]["packets"], udp_in[0]["bytes"]) == ("4", "116")
    udp_out = find(ok, srcaddr=web.ip4, srcport=53, protocol=17)
    assert (udp_out["packets"], udp_out["bytes"], udp_out["action"]) == ("4", "116", "ACCEPT")
    assert flow_of(seen, cli.ip4, web.ip4, 17, dport=53) == (4, 116)
    # accepted ICMP echo: ports 0, 3 requests and 3 replies of 84 bytes
    for src, dst in ((cli.ip4, web.ip4), (web.ip4, cli.ip4)):
        rec = find(ok, srcaddr=src, dstaddr=dst, protocol=1, action="ACCEPT")
        assert (rec["srcport"], rec["dstport"], rec["packets"], rec["bytes"]) == \
            ("0", "0", "3", "252")
    # rejected: one SYN (60 bytes), 5 UDP datagrams of 100 bytes, 2 ICMP timestamps
    syn = find(ok, srcport=t["rej_syn"], dstport=22, protocol=6)
    assert (syn["packets"], syn["bytes"], syn["action"]) == ("1", "60", "REJECT")
    udp = find(ok, srcport=t["rej_udp"], dstport=9999, protocol=17)
    assert (udp["packets"], udp["bytes"], udp["action"]) == ("5", "640", "REJECT")
    ts = find(ok, srcaddr=cli.ip4, protocol=1, action="REJECT")
    assert (ts["packets"], ts["bytes"], ts["srcport"]) == ("2", "72", "0")
    # IPv6: the echo requests and replies (40 + 8 + 56 bytes each)
    for src, dst in ((cli.ip6, web.ip6), (web.ip6, cli.ip6)):
        rec = find(records, srcaddr=src, dstaddr=dst, protocol=58)
        assert (rec["packets"], rec["bytes"], rec["action"]) == ("3", "312", "ACCEPT"), rec
    # nothing was rejected that the sniffer saw, nothing the sniffer saw is missing
    assert flow_of(seen, cli.ip4, web.ip4, 17, dport=9999) == (0, 0)
    assert len(ok) == 9, ok


def test_custom_format_fields_and_tail(topo: Topology, daemon: DaemonProc,
                                       tmp_path: Path) -> None:
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.jsonl"
    fmt = " ".join(f"${{{f}}}" for f in CUSTOM)
    daemon.start("--flow-log", str(log), "--flow-log-window", "600", "--flow-log-format", fmt,
                 "--flow-log-encoding", "json")
    with daemon.client() as c:
        t = run_traffic(topo, c)
    log.write_text("")
    records = flush_records(daemon, log, CUSTOM, json_lines=True)
    assert all(list(r) == CUSTOM for r in records)
    assert all(r["version"] == "5" for r in records)  # flow-direction is a version 5 field
    # (the instances' own IPv6 chatter, MLD reports and the like, is not ours to check)
    ok = [r for r in records if r["log-status"] == "OK" and r["type"] == "IPv4"]
    for r in ok:
        assert r["interface"] == web.host_dev and r["vpc-id"] == "-"
        assert (r["pkt-srcaddr"], r["pkt-dstaddr"]) == (r["srcaddr"], r["dstaddr"])
        assert r["flow-direction"] == ("ingress" if r["dstaddr"] == web.ip4 else "egress")
        if r["action"] == "ACCEPT":
            assert r["reject-reason"] == "-" and r["group-id"] == t["gid"]
        else:
            assert r["reject-reason"] == "drop_no_rule"
            assert (r["rule-id"], r["group-id"]) == ("-", "-")
    tcp_in = find(ok, srcport=t["tcp_port"], dstport=80)
    tcp_out = find(ok, srcport=80, dstport=t["tcp_port"])
    # SYN and FIN from the client; SYN-ACK (18) and FIN from the server
    assert int(tcp_in["tcp-flags"]) & 0x13 == 0x03, tcp_in
    assert int(tcp_out["tcp-flags"]) & 0x13 == 0x13, tcp_out
    # a connection's both directions name the rule that admitted it
    assert tcp_in["rule-id"] == tcp_out["rule-id"] == t["rules"][("tcp", 80)]
    assert find(ok, dstport=53, action="ACCEPT")["rule-id"] == t["rules"][("udp", 53)]
    assert find(ok, srcaddr=cli.ip4, protocol=1, action="ACCEPT")["rule-id"] == \
        t["rules"][("icmp", 8)]
    assert find(ok, srcport=t["rej_syn"], dstport=22)["tcp-flags"] == "2"
    assert find(ok, dstport=9999)["tcp-flags"] == "0"
    # flows tail: the same records through the API, filtered
    out = daemon.cli("flows", "tail", "--action", "REJECT", "-n", "100", "-o", "json")
    assert out.returncode == 0, out.stderr
    tail = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["protocol"], r["dstport"]) for r in tail} >= {(6, 22), (17, 9999), (1, 0)}
    assert all(r["action"] == "REJECT" for r in tail)
    text = daemon.cli("flows", "tail", "--interface", web.host_dev, "-n", "3")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3
    assert all(len(line.split(" ")) == len(CUSTOM) for line in text.stdout.splitlines())


def test_skipdata_when_an_event_flood_meets_the_rate_limit(topo: Topology,
                                                           daemon: DaemonProc,
                                                           tmp_path: Path) -> None:
    """5000 rejected datagrams against 100 events/s per CPU: most are not
    logged; the interface's window says SKIPDATA, the logged ones plus the
    skipped ones are exactly what was sent, and the daemon keeps answering."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.log"
    port = free_port()
    daemon.start("--flow-log", str(log), "--flow-log-window", "600", "--flow-log-rate", "100",
                 "--flow-log-burst", "100", "--flow-log-interface-rate", "100",
                 "--metrics-address", f"127.0.0.1:{port}")
    with daemon.client() as c:
        web_setup(c, topo, [])
        c.call("FlushFlowLogs", {})
        log.write_text("")
        n = 5000
        sport = udp_send(cli, web.ip4, 7777, n)
        records = flush_records(daemon, log, V2)
        rej = [r for r in records if r["log-status"] == "OK" and r["srcport"] == str(sport)]
        assert len(rej) == 1 and rej[0]["action"] == "REJECT"
        logged = int(rej[0]["packets"])
        assert 50 <= logged < n // 2, logged  # the burst (100 a CPU) and the trickle after it
        skip = [r for r in records if r["log-status"] == "SKIPDATA"]
        assert len(skip) == 1 and skip[0]["action"] == "-" and skip[0]["srcaddr"] == "-"
        status = c.call("DescribeStatus", {})
        iface = status["interfaces"][0]
        assert iface["counters"]["ingress/drop_no_rule"]["packets"] >= n
        # every datagram is either logged or skipped (give or take the instance's own
        # IPv6 chatter, which shares the interface's budget)
        assert n - logged <= status["flow_logs"]["skipped"] <= n - logged + 5
        eni = iface["interface"]
        table = daemon.cli("status").stdout
        assert "flow logs: to" in table and "1 SKIPDATA" in table, table
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        m = {(x.name, tuple(sorted(x.labels.items()))): x.value
             for fam in text_string_to_metric_families(text.decode()) for x in fam.samples}
        assert m[("sgctl_flow_log_skipped_events_total", (("interface", eni),))] >= n - logged
        assert m[("sgctl_flow_log_records_total", (("log_status", "SKIPDATA"),))] >= 1
        assert m[("sgctl_flow_log_events_total", ())] >= logged
        assert c.call("GetFlowLogRecords", {"Filters": [{"Name": "action", "Values": ["REJECT"]}]}
                      )["Records"]


def test_a_flood_on_one_interface_leaves_the_others_logs_whole(topo: Topology,
                                                              daemon: DaemonProc,
                                                              tmp_path: Path) -> None:
    """Flow-log events are limited per interface as well as per host. From
    one CPU: 5000 rejected datagrams to web (its share: 100 events a second,
    bursts of 100), then 20 rejected ones to cli. cli's are all logged and
    cli has no SKIPDATA; web's flood is mostly skipped. (With one budget per
    CPU for every interface, the flood spent it and cli's were skipped.)"""
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.log"
    daemon.start("--flow-log", str(log), "--flow-log-window", "600", "--flow-log-rate", "1000",
                 "--flow-log-interface-rate", "100")
    with daemon.client() as c:
        web_setup(c, topo, [])
        gid = c.call("CreateSecurityGroup", {"GroupName": unique("cli"),
                                             "Description": "cli"})["GroupId"]
        c.call("CreateNetworkInterface", {
            "Groups": [gid], "PrivateIpAddress": cli.ip4, "MacAddress": cli.mac,
            "TagSpecifications": [{"ResourceType": "network-interface", "Tags": [
                {"Key": "host-interface", "Value": cli.host_dev}]}]})
        eni = {r["device"]: r["interface"] for r in c.call("DescribeStatus", {})["interfaces"]}
        c.call("FlushFlowLogs", {})
        log.write_text("")
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})  # the flood and the rest decided on one CPU
        try:
            flood = udp_send(cli, web.ip4, 7777, 5000)
            quiet = udp_send(web, cli.ip4, 8888, 20)
        finally:
            os.sched_setaffinity(0, cpus)
        records = flush_records(daemon, log, V2)
    at_cli = find(records, interface_id=eni[cli.host_dev], srcport=quiet, action="REJECT")
    assert at_cli["packets"] == "20"
    skipped = {r["interface-id"] for r in records if r["log-status"] == "SKIPDATA"}
    assert eni[web.host_dev] in skipped and eni[cli.host_dev] not in skipped
    at_web = find(records, interface_id=eni[web.host_dev], srcport=flood, action="REJECT")
    assert int(at_web["packets"]) < 1000


def test_windows_close_by_themselves_idle_interfaces_say_nodata_stdout_too(
        topo: Topology, daemon: DaemonProc, tmp_path: Path) -> None:
    """1 s windows: records appear without a flush, in the file, on stdout
    and through `flows tail --follow`; an interface whose device is down
    (no traffic at all) says NODATA every window."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.log"
    idle = unique("sgi")
    sh("ip", "link", "add", idle, "type", "veth", "peer", "name", idle + "p")
    follow = None
    try:
        daemon.start("--flow-log", str(log), "--flow-log", "-", "--flow-log-window", "1")
        with daemon.client() as c:
            web_setup(c, topo, [udp_perm(53, cli.ip4 + "/32")])
            quiet = c.call("CreateNetworkInterface", {"Groups": [], "TagSpecifications": [
                {"ResourceType": "network-interface", "Tags": [
                    {"Key": "host-interface", "Value": idle}]}]}
            )["NetworkInterface"]["NetworkInterfaceId"]
        follow = subprocess.Popen([*daemon.base(), "flows", "tail", "--follow", "--action",
                                   "ACCEPT", "-o", "json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, bufsize=0, cwd=ROOT)
        time.sleep(2.5)
        udp_exchanges(cli, web.ip4, 53, 3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [dict(zip(V2, line.split(" "))) for line in log.read_text().splitlines()]
            if any(r["dstport"] == "53" for r in lines):
                break
            time.sleep(0.2)
        assert follow.stdout is not None
        followed = []  # until the UDP flow shows (other ACCEPT records may come first);
        # unbuffered, so that select() sees every line
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r["dstport"] == 53 for r in followed):
            if select.select([follow.stdout], [], [], 0.5)[0]:
                followed.append(json.loads(follow.stdout.readline()))
    finally:
        if follow is not None:
            follow.terminate()
            follow.wait(timeout=10)
        sh("ip", "link", "del", idle, check=False)
    nodata = [r for r in lines if r["log-status"] == "NODATA" and r["interface-id"] == quiet]
    assert len(nodata) >= 2 and all(int(r["end"]) - int(r["start"]) <= 2 for r in nodata)
    assert not [r for r in lines if r["interface-id"] == quiet and r["log-status"] != "NODATA"]
    assert sum(int(r["packets"]) for r in lines if r["dstport"] == "53") == 3
    # `flows tail --follow` printed them as they came
    assert {(r["srcport"], r["dstport"]) for r in followed if r["dstport"] == 53} == {
        (int(r["srcport"]), int(r["dstport"])) for r in lines if r["dstport"] == "53"}
    # the same records on stdout (which DaemonProc sends to its log)
    stdout = daemon.logs().splitlines()
    assert all(" ".join(r.values()) in stdout for r in lines if r["dstport"] == "53")


def test_bad_flow_log_settings_are_refused(daemon: DaemonProc) -> None:
    with pytest.raises(FlowLogError, match="unknown field 'srcaddress'"):
        parse_format("${version} ${srcaddress}")
    with pytest.raises(FlowLogError, match="not of the form"):
        parse_format("version srcaddr")
    for flags, message in ((("--flow-log-format", "${bogus}"), "unknown field 'bogus'"),
                           (("--flow-log-window", "601"), "must be 1-600 seconds"),
                           (("--flow-log-rate", "100", "--flow-log-interface-rate", "101"),
                            "interface rate 101: must be 1 to the host's rate (100)")):
        out = daemon.cli("daemon", "--flow-log", "-", *flags)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_connection_is_reported_per_window_and_when_deleted_early(
        topo: Topology, daemon: DaemonProc, tmp_path: Path) -> None:
    """One UDP flow over two windows: each window reports only its own
    packets (growth since the last scan). Then its conntrack entry is
    deleted before the window ends (flush; the GC takes the same path):
    its last packets are still reported; so are those of a connection whose
    interface is deleted."""
    web, cli = topo.instances["web"], topo.instances["cli"]
    log = tmp_path / "flows.log"
    daemon.start("--flow-log", str(log), "--flow-log-window", "600")
    with daemon.client() as c:
        web_setup(c, topo, [udp_perm(53, cli.ip4 + "/32")])
        c.call("FlushFlowLogs", {})
        with cli.inside():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.bind(("0.0.0.0", 0))
        sport = s.getsockname()[1]

        def exchange(k: int) -> List[Tuple[str, str]]:
            for i in range(k):
                s.sendto(b"%d" % i, (web.ip4, 53))
                assert s.recvfrom(64)[0] == b"%d" % i
            records = flush_records(daemon, log, V2)
            log.write_text("")
            return sorted((r["packets"], r["bytes"]) for r in records
                          if str(sport) in (r["srcport"], r["dstport"]))

        try:
            log.write_text("")
            assert exchange(3) == [("3", "87"), ("3", "87")]
            assert exchange(2) == [("2", "58"), ("2", "58")]
            for i in range(4):
                s.sendto(b"%d" % i, (web.ip4, 53))
                assert s.recvfrom(64)[0] == b"%d" % i
            assert c.call("FlushConntrack", {})["Flushed"] >= 1
            records = flush_records(daemon, log, V2)
            assert sorted((r["packets"], r["bytes"]) for r in records
                          if str(sport) in (r["srcport"], r["dstport"])) == \
                [("4", "116"), ("4", "116")]
            # the interface goes away mid-window: its connection's last packets are
            # reported under its name
            log.write_text("")
            for i in range(2):
                s.sendto(b"%d" % i, (web.ip4, 53))
                assert s.recvfrom(64)[0] == b"%d" % i
            eni = c.call("DescribeNetworkInterfaces", {})["NetworkInterfaces"][0]
            c.call("DeleteNetworkInterface", {"NetworkInterfaceId": eni["NetworkInterfaceId"]})
            records = flush_records(daemon, log, V2)
            assert sorted((r["interface-id"], r["packets"], r["bytes"]) for r in records
                          if str(sport) in (r["srcport"], r["dstport"])) == \
                [(eni["NetworkInterfaceId"], "2", "58")] * 2
        finally:
            s.close()
