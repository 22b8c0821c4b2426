"""The reconciler's plan, without root: tables of {desired, host, applied ->
plan}. ``recorded`` stands in for a converge (what the kernel write would
record), so sequences of changes are planned as the daemon would."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest

from controller import abi
from controller.policy.formats import load_document
from controller.policy.model import State
from controller.reconcile.applied import Applied
from controller.reconcile.plan import Device, KernelView, Plan, PlanError, plan

ETH = abi.ARPHRD_ETHER


def doc(ports: str = "22", devices: Optional[Dict[str, str]] = None,
        addrs: Optional[Dict[str, List[str]]] = None, groups: Optional[Dict[str, List[str]]] = None
        ) -> State:
    devices = {"eni-a": "sgp0"} if devices is None else devices
    ifaces: Dict[str, Any] = {}
    for eni, dev in devices.items():
        ifaces[eni] = {"groups": (groups or {}).get(eni, ["sg-a"]), "device": dev,
                       "ipv4": (addrs or {}).get(eni, ["198.18.0.10"])}
    return load_document({"sgctl": 1, "groups": {
        "sg-a": {"name": "a", "ingress": [{"proto": "tcp", "ports": ports, "from": "198.18.1.0/24"}]},
        "sg-b": {"name": "b"}}, "interfaces": ifaces})


def done(p: Plan) -> Applied:
    """The applied record once ``p`` is executed (world classes aside)."""
    pols = dict(p.kept)
    pols.update({w.name: w.record({}) for w in p.writes})
    return p.recorded(pols, 1, [], None)


def images(applied: Applied) -> KernelView:
    """The kernel as one process left it: every policy id it recorded has an image."""
    return KernelView(images=frozenset(i for r in applied.policies.values() for i in r.ids))


HOST = {"sgp0": Device(7, ETH), "sgp1": Device(8, ETH)}


def test_first_plan_writes_a_fresh_policy_and_binds() -> None:
    p = plan(doc(), HOST, Applied())
    assert [(w.name, w.target, w.base) for w in p.writes] == [("sg-a", 1, None)]
    (ep,) = p.endpoints
    assert (ep.eni_id, ep.record.ifindex, ep.record.ep_id, ep.new_id) == ("eni-a", 7, 1, True)
    assert p.gone == {} and p.unbind == [] and p.dead_policies == []
    assert p.summary["eni-a"].policy_id == 1 and not p.summary["eni-a"].pending
    assert len(p.local) == 1, "its own address for the source check"


def test_the_same_state_again_writes_nothing() -> None:
    first = done(plan(doc(), HOST, Applied()))
    p = plan(doc(), HOST, first, images(first))
    assert p.writes == [] and list(p.kept) == ["sg-a"]
    assert [e.new_id for e in p.endpoints] == [False]
    assert p.dead_policies == [] and p.cut == {}


CHANGES = [
    # (description, kernel images known, expected (target, base), dead ids)
    ("a change writes its difference into the inactive id", True, (1, 1), []),
    ("a new process does not know the images: a fresh id, the old one dies", False, (3, None),
     [1]),
]


@pytest.mark.parametrize("desc,known,want,dead", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_policy(desc: str, known: bool, want: tuple, dead: List[int]) -> None:
    a1 = done(plan(doc("22"), HOST, Applied()))
    a2 = done(plan(doc("80"), HOST, a1, images(a1)))  # id 2 active, 1 inactive
    assert a2.policies["sg-a"].ids == [2, 1]
    p = plan(doc("443"), HOST, a2, images(a2) if known else KernelView())
    (w,) = p.writes
    assert (w.target, w.base) == want, desc
    assert w.ids[0] == w.target and w.ids[1] == 2, "the active one becomes the inactive one"
    assert p.dead_policies == dead


def test_a_fresh_id_never_reuses_one_a_failed_write_left() -> None:
    p = plan(doc(), HOST, Applied(), KernelView(images=frozenset({1, 2})))
    assert p.writes[0].target == 3
    assert p.dead_policies == [1, 2], "the leftovers are deleted"


DEVICES = [
    ("absent, pending allowed", {}, True, None, ["eni-a"]),
    ("absent is an error otherwise", {}, False, "device 'sgp0' does not exist", None),
    ("not Ethernet", {"sgp0": Device(7, 65534)}, False, "not an Ethernet device", None),
]


@pytest.mark.parametrize("desc,host,missing_ok,error,pending", DEVICES, ids=[d[0] for d in DEVICES])
def test_devices(desc: str, host: dict, missing_ok: bool, error: Optional[str],
                 pending: Optional[List[str]]) -> None:
    if error:
        with pytest.raises(PlanError, match=error):
            plan(doc(), host, Applied(), missing_ok=missing_ok)
        return
    p = plan(doc(), host, Applied(), missing_ok=missing_ok)
    assert p.pending == pending and p.endpoints == []
    assert p.summary["eni-a"].pending, desc


def test_a_recreated_device_gets_a_new_endpoint_and_the_old_one_goes() -> None:
    a1 = done(plan(doc(), HOST, Applied()))
    p = plan(doc(), {"sgp0": Device(9, ETH)}, a1, KernelView(ep_ids=frozenset({1})))
    (ep,) = p.endpoints
    assert (ep.record.ifindex, ep.new_id) == (9, True)
    assert ep.record.ep_id == 2, "an id the kernel still holds is not reused yet"
    assert list(p.gone) == ["eni-a"] and p.unbind == [7]


def test_an_interface_removed_is_unbound_and_its_policy_dies() -> None:
    two = {"eni-a": "sgp0", "eni-b": "sgp1"}
    a1 = done(plan(doc(devices=two, groups={"eni-b": ["sg-b"]}), HOST, Applied()))
    p = plan(doc(), HOST, a1, images(a1))
    assert list(p.gone) == ["eni-b"] and p.unbind == [8]
    assert p.dead_policies == [a1.policies["sg-b"].active]


def test_a_lost_address_cuts_its_connections() -> None:
    a1 = done(plan(doc(addrs={"eni-a": ["198.18.0.10", "198.18.0.11"]}), HOST, Applied()))
    p = plan(doc(), HOST, a1, images(a1))
    ep_id = a1.endpoints["eni-a"].ep_id
    assert list(p.cut) == [ep_id] and len(p.cut[ep_id]) == 1
    assert plan(doc(addrs={"eni-a": ["198.18.0.10", "198.18.0.11"]}), HOST, a1,
                images(a1)).cut == {}, "nothing lost, nothing cut"


def test_rule_numbers_are_kept_and_never_recycled_early() -> None:
    a1 = done(plan(doc(), HOST, Applied()))
    p = plan(doc("80"), HOST, a1, images(a1))
    kept = set(p.rule_index) & set(a1.rule_index)
    assert kept and all(p.rule_index[r] == a1.rule_index[r] for r in kept)
    (new,) = set(p.rule_index) - set(a1.rule_index)
    assert p.rule_index[new] == a1.next_rule_index, "a fresh number, not the one just freed"
    assert p.reused_rules == []


def test_an_interface_of_another_node_is_a_member_elsewhere() -> None:
    """Bound only by its own node's agent; its addresses still count for the
    groups that reference its group."""
    state = load_document({"sgctl": 1, "groups": {
        "sg-a": {"name": "a", "ingress": [{"proto": "tcp", "ports": 22, "from": "sg-b"}]},
        "sg-b": {"name": "b"}}, "interfaces": {
        "eni-a": {"groups": ["sg-a"], "device": "sgp0", "ipv4": ["198.18.0.10"]},
        "eni-b": {"groups": ["sg-b"], "device": "sgp1", "node": "h2", "ipv4": ["198.18.0.20"]}}})
    here = plan(state.for_node("h1"), HOST, Applied())
    assert [e.eni_id for e in here.endpoints] == ["eni-a"]
    (w,) = [w for w in here.writes if w.name == "sg-a"]
    assert any(plen == 32 and net == int.from_bytes(bytes([198, 18, 0, 20]), "big")
               for (_, fam, plen, net) in w.policy.peers if fam == 4), "eni-b's address counts"
    there = plan(state.for_node("h2"), HOST, Applied())
    assert [e.eni_id for e in there.endpoints] == ["eni-a", "eni-b"], "no node: every host's"
    assert state.interfaces["eni-b"].device == "sgp1", "for_node does not change the state"
