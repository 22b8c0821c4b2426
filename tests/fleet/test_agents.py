"""Several agents (each a "host": its own pins, state dir, socket, node name)
sharing one etcd: a change through any agent reaches every agent's kernel,
an interface is bound only by its node's agent, concurrent writers lose no
update, and the agents ride out etcd going away."""

from __future__ import annotations

import subprocess
import threading
from typing import Dict, Iterator, List

import pytest

from controller.policy.errors import ApiError
from controller.tools.etcd import EtcdProc
from controller.tools.topology import Topology
from tests.daemonproc import (
    DaemonProc,
    Ec2Daemon,
    Prober,
    Stream,
    tcp_perm,
    udp_perm,
    wait_for,
    web_setup,
)
from tests.harness import unique

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def fleet() -> Iterator[Dict[str, DaemonProc]]:
    """Three agents and their etcd for the module (the etcd test comes last:
    it stops etcd and starts it again)."""
    etcd = EtcdProc()
    agents = {name: DaemonProc() for name in ("n1", "n2", "n3")}
    prefix = f"/{unique('sgf')}/"
    try:
        agents["etcd"] = etcd  # type: ignore[assignment]
        agents["prefix"] = prefix  # type: ignore[assignment]
        for name in ("n1", "n2", "n3"):
            start(agents, name)
        yield agents
    finally:
        for name, a in agents.items():
            if name.startswith("n"):
                a.close()
        etcd.close()


def start(fleet: Dict[str, DaemonProc], node: str) -> None:
    """(Re)start the agent of ``node`` on the fleet's etcd."""
    fleet[node].start("--datastore", f"etcd://{fleet['etcd'].endpoint}",  # type: ignore[attr-defined]
                      "--etcd-prefix", str(fleet["prefix"]), "--node", node)


def create_group(a: DaemonProc, name: str) -> str:
    with a.client() as api:
        return str(api.call("CreateSecurityGroup", {"GroupName": name,
                                                    "Description": name})["GroupId"])


def groups(a: DaemonProc) -> List[str]:
    with a.client() as c:
        return sorted(g["GroupId"] for g in c.call("DescribeSecurityGroups")["SecurityGroups"])


def bound(a: DaemonProc) -> List[str]:
    with a.client() as c:
        return sorted(r["interface"] for r in c.call("DescribeStatus")["interfaces"]
                      if not r.get("pending"))


def test_a_change_on_one_agent_reaches_every_agent(fleet: Dict[str, DaemonProc]) -> None:
    a, b, c = fleet["n1"], fleet["n2"], fleet["n3"]
    gid = create_group(a, "web")
    for other in (b, c):
        wait_for(lambda o=other: gid in groups(o), 5)
    with b.client() as api:
        status = api.call("DescribeStatus")["fleet"]
    assert status["node"] == "n2" and status["stale_since"] is None
    assert set(status["nodes"]) == {"n1", "n2", "n3"}, "every agent registered"


def test_any_agents_ec2_endpoint_serves_the_whole_fleet(fleet: Dict[str, DaemonProc]) -> None:
    """An agent with the EC2 endpoint reads and writes the fleet's state:
    what another agent wrote is there, what it writes reaches the others."""
    a, b = fleet["n1"], fleet["n2"]
    d = DaemonProc()
    try:
        ec2 = Ec2Daemon(d, False, "--datastore", f"etcd://{fleet['etcd'].endpoint}",  # type: ignore[attr-defined]
                        "--etcd-prefix", str(fleet["prefix"]), "--node", "n4")
        c = ec2.client()
        gid = create_group(a, unique("from-json"))
        wait_for(lambda: gid in {g["GroupId"] for g in c.describe_security_groups()[
            "SecurityGroups"]}, 5)
        other = c.create_security_group(GroupName=unique("from-ec2"), Description="x")["GroupId"]
        c.authorize_security_group_ingress(GroupId=other, IpPermissions=[tcp_perm(443,
                                                                                  "198.18.0.0/24")])
        wait_for(lambda: other in groups(b), 5)
        with b.client() as api:
            rules = api.call("DescribeSecurityGroupRules", {"Filters": [
                {"Name": "group-id", "Values": [other]}]})["SecurityGroupRules"]
        assert any(r.get("FromPort") == 443 for r in rules)
    finally:
        d.close()


def test_an_interface_is_bound_by_its_node_only(fleet: Dict[str, DaemonProc]) -> None:
    a, c = fleet["n1"], fleet["n3"]
    dev = unique("sgfd")
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"],
                   check=True)
    try:
        with a.client() as api:  # created through n1, for n3
            gid = api.call("CreateSecurityGroup", {"GroupName": "g", "Description": "g"})["GroupId"]
            eni = api.call("CreateNetworkInterface", {
                "Groups": [gid], "PrivateIpAddress": "198.18.3.3", "Node": "n3",
                "TagSpecifications": [{"ResourceType": "network-interface", "Tags": [
                    {"Key": "host-interface", "Value": dev}]}]})["NetworkInterface"]
        eid = eni["NetworkInterfaceId"]
        wait_for(lambda: eid in bound(c), 5)
        assert eid not in bound(a), "n1 has a device of that name too, but it is n3's interface"
        with a.client() as api:  # the fleet knows where it is bound
            wait_for(lambda: eid in api.call("DescribeStatus")["fleet"]["nodes"]["n3"][
                "interfaces"], 5)
    finally:
        subprocess.run(["ip", "link", "del", dev], check=False)


def test_concurrent_writers_lose_no_update(fleet: Dict[str, DaemonProc]) -> None:
    a, b = fleet["n1"], fleet["n2"]
    gid = create_group(a, "c")
    wait_for(lambda: gid in groups(b), 5)
    errors: List[Exception] = []

    def writer(agent: DaemonProc, ports: range) -> None:
        try:
            with agent.client() as api:
                for p in ports:
                    api.call("AuthorizeSecurityGroupIngress", {
                        "GroupId": gid, "IpPermissions": [tcp_perm(p, "198.18.0.0/24")]})
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(a, range(1000, 1010))),
               threading.Thread(target=writer, args=(b, range(2000, 2010)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with fleet["n3"].client() as api:
        wait_for(lambda: len(api.call("DescribeSecurityGroupRules", {
            "Filters": [{"Name": "group-id", "Values": [gid]}]})["SecurityGroupRules"]) >= 21, 5)
        ports = sorted(r["FromPort"] for r in api.call("DescribeSecurityGroupRules", {
            "Filters": [{"Name": "group-id", "Values": [gid]}]})["SecurityGroupRules"]
            if not r["IsEgress"])
    assert ports == [*range(1000, 1010), *range(2000, 2010)], "every write of both agents"


def test_an_agent_killed_converges_on_what_it_missed(fleet: Dict[str, DaemonProc]) -> None:
    a, c = fleet["n1"], fleet["n3"]
    c.kill()  # kill -9: its programs stay, enforcing its last state
    gid = create_group(a, "m")
    start(fleet, "n3")
    wait_for(lambda: gid in groups(c), 10)


def test_etcd_killed_under_traffic(fleet: Dict[str, DaemonProc], topo: Topology) -> None:
    """etcd goes away and comes back while traffic flows through n1: a held
    connection survives, allowed stays allowed, denied stays denied; writes
    are refused meanwhile (reads answered, marked stale), then accepted."""
    a, b = fleet["n1"], fleet["n2"]
    etcd: EtcdProc = fleet["etcd"]  # type: ignore[assignment]
    web, cli = topo.instances["web"], topo.instances["cli"]
    with a.client() as api:
        gid = web_setup(api, topo, [tcp_perm(80, "198.18.0.0/24"), udp_perm(53, "198.18.0.0/24")])
    wait_for(lambda: cli.can_tcp(web.ip4, 80), 10)
    stream, prober = Stream(cli, web.ip4), Prober(cli, web.ip4, 9999)
    try:
        etcd.kill()
        with a.client() as api:
            with pytest.raises(ApiError) as err:
                api.call("CreateSecurityGroup", {"GroupName": "x", "Description": "x"})
            assert err.value.code == "ServiceUnavailable"
            assert gid in [g["GroupId"] for g in api.call("DescribeSecurityGroups")["SecurityGroups"]]
            wait_for(lambda: api.call("DescribeStatus")["fleet"]["stale_since"] is not None, 20)
        assert cli.can_tcp(web.ip4, 80), "allowed stays allowed"
        assert not cli.can_tcp(web.ip4, 22), "denied stays denied"
        etcd.start()
        with b.client() as api:
            wait_for(lambda: api.call("DescribeStatus")["fleet"]["stale_since"] is None, 20)
            api.call("AuthorizeSecurityGroupIngress", {"GroupId": gid,  # a write through n2
                                                       "IpPermissions": [tcp_perm(22, "198.18.0.0/24")]})
        wait_for(lambda: cli.can_tcp(web.ip4, 22), 20)
        assert stream.tcp_rounds > 0 and not stream.errors, stream.errors
    finally:
        stream.finish()
        prober.finish()
    assert prober.sent > 0 and prober.answered == 0, "a denied packet got through"
    with a.client() as api:  # the interface goes, so the module's other tests see no binding
        eni = next(e["NetworkInterfaceId"] for e in api.call("DescribeNetworkInterfaces")[
            "NetworkInterfaces"] if e["PrivateIpAddress"] == web.ip4)
        api.call("DeleteNetworkInterface", {"NetworkInterfaceId": eni})


def test_an_agent_restarted_without_etcd_enforces_its_cache(fleet: Dict[str, DaemonProc]) -> None:
    a, b = fleet["n1"], fleet["n2"]
    etcd: EtcdProc = fleet["etcd"]  # type: ignore[assignment]
    gid = create_group(a, "z")
    wait_for(lambda: gid in groups(b), 5)
    etcd.kill()
    b.kill()
    start(fleet, "n2")
    assert gid in groups(b), "the cached state, from the state dir"
    with b.client() as api:
        assert api.call("DescribeStatus")["fleet"]["stale_since"] is not None
    etcd.start()
    with b.client() as api:
        wait_for(lambda: api.call("DescribeStatus")["fleet"]["stale_since"] is None, 20)

