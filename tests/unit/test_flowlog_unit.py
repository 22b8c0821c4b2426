"""The flow logger's own logic without a kernel: aggregation, the memory
bound on flows per window, record rendering (fake maps stand in for the
kernel's)."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any, Iterator, List, Tuple

from controller import abi
from controller.abi.reasons import Reason
from controller.kernel.conntrack import WallClock
from controller.service.flowlog import FlowLogConfig, FlowLogger


class FakeMap:
    def batch_items(self) -> Iterator[Tuple[Any, Any]]:
        return iter(())

    def lookup(self, key: Any) -> Any:
        return None

    def array_range(self, start: int, count: int) -> List[Any]:
        return [[0] for _ in range(count)]


class FakeDataplane:
    pin_dir = "/nonexistent"

    def map(self, name: str) -> FakeMap:
        return FakeMap()


def event(ep_id: int, sport: int, reason: Reason = Reason.DROP_NO_RULE, nbytes: int = 100,
          tracked: int = 0) -> abi.FlowEvent:
    ev = abi.FlowEvent(ts_ns=0, ep_id=ep_id, dir=abi.DIR_INGRESS, reason=int(reason), family=4,
                       proto=17, sport=socket.htons(sport), dport=socket.htons(53),
                       bytes=nbytes, tracked=tracked)
    ev.src = abi.addr_words(ipaddress.ip_address("198.18.0.30").packed)
    ev.dst = abi.addr_words(ipaddress.ip_address("198.18.0.10").packed)
    return ev


def logger(tmp_path: Any, **cfg: Any) -> Tuple[FlowLogger, Any]:
    out = tmp_path / "flows.log"
    names = ({1: ("eni-a", "veth-a"), 2: ("eni-b", "veth-b")}, {7: ("sgr-7", "sg-1")})
    fl = FlowLogger(FakeDataplane(), FlowLogConfig(outputs=[str(out)], **cfg),  # type: ignore
                    lambda: names)
    return fl, out


def lines(path: Any) -> List[List[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()]


def test_events_aggregate_per_flow_and_idle_interfaces_get_nodata(tmp_path: Any) -> None:
    fl, out = logger(tmp_path, account_id="123456789012")
    for _ in range(3):
        fl._event(event(1, 1000))
    fl._event(event(1, 1001, Reason.ALLOW_UNTRACKED, 60))
    fl._event(event(1, 1002, Reason.ALLOW_NEW, 60, tracked=1))  # counted in conntrack
    fl.close_window()
    got = lines(out)
    assert [r[:10] for r in got if r[5] == "1000"] == [
        ["2", "123456789012", "eni-a", "198.18.0.30", "198.18.0.10", "1000", "53", "17", "3",
         "300"]]
    assert [(r[8], r[9], r[12], r[13]) for r in got if r[5] == "1001"] == [
        ("1", "60", "ACCEPT", "OK")]
    assert not [r for r in got if r[5] == "1002"], "a tracked start alone has no packets"
    nodata = [r for r in got if r[13] == "NODATA"]
    assert len(nodata) == 1 and nodata[0][2] == "eni-b"
    assert nodata[0][3:10] == ["-"] * 7 and nodata[0][12] == "-"  # no flow, no action
    assert int(nodata[0][10]) <= int(nodata[0][11])  # the window


def test_flows_past_the_memory_bound_become_skipdata(tmp_path: Any) -> None:
    fl, out = logger(tmp_path, max_flows=3, encoding="json")
    for port in range(1000, 1005):
        fl._event(event(2, port))
    fl._event(event(2, 1000))  # a known flow is still counted
    fl.close_window()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [r for r in got if r["log-status"] == "OK"]
    assert sorted((r["srcport"], r["packets"]) for r in ok) == [(1000, 2), (1001, 1), (1002, 1)]
    skip = [r for r in got if r["log-status"] == "SKIPDATA"]
    assert [(r["interface-id"], r["srcaddr"], r["action"]) for r in skip] == [
        ("eni-b", None, None)]
    assert fl.stats()["skipped"] == 2
    fl.close_window()  # the next window starts clean: no SKIPDATA, both idle
    again = [json.loads(line) for line in out.read_text().splitlines()][len(got):]
    assert sorted(r["log-status"] for r in again) == ["NODATA", "NODATA"]


def test_files_rotate_at_their_size(tmp_path: Any) -> None:
    fl, out = logger(tmp_path, max_bytes=2000, backups=2)
    for _ in range(30):
        for port in range(5):
            fl._event(event(1, 2000 + port))
        fl.close_window()
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["flows.log", "flows.log.1", "flows.log.2"], rotated
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert all(len(r) == 14 for r in lines(out))


def test_a_datapath_stamp_becomes_a_wall_time_never_after_the_event() -> None:
    # the datapath stamps whole seconds: an event at clock 100.9 is stamped 100
    clock = WallClock(dp_now=101.2, wall_now=5000.0)  # read 0.3 s after the event
    event_wall = 5000.0 - 0.3
    assert event_wall - 1 < clock.of(100) <= event_wall
    assert clock.of(101) <= clock.wall_now  # this second's stamp: not in the future
    assert clock.of(102) == clock.wall_now  # a stamp ahead of the reading (a race): now


def test_an_interface_gets_a_share_of_the_host_events_with_as_long_a_burst() -> None:
    assert FlowLogConfig(rate=10000, burst=20000).per_interface() == (2500, 5000)
    assert FlowLogConfig(rate=1000, burst=1000, interface_rate=100).per_interface() == (100, 100)
    assert FlowLogConfig(rate=3, burst=1).per_interface() == (1, 1)  # never below one event
