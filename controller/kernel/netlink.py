"""Attach/detach the programs with pyroute2: XDP on receive, tc clsact egress."""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Set, Tuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from controller.kernel import bpfsys
from controller.policy.errors import EnforcementError

XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE = 1, 2, 4, 16
TC_EGRESS_PARENT = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
TC_PRIO = 0xC000
TC_HANDLE = 1
FILTER_NAME = "sgctl"


class AttachError(EnforcementError):
    """A program could not be attached to (or detached from) a device."""


def ifindex(name: str) -> Optional[int]:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None


def devices(via: Optional[IPRoute] = None) -> Dict[str, Tuple[int, int]]:
    """Every device of the host: name -> (ifindex, ARPHRD_* link type), one dump."""
    with route(via) as ipr:
        return {link.get_attr("IFLA_IFNAME"): (int(link["index"]), int(link["ifi_type"]))
                for link in ipr.get_links()}


@contextlib.contextmanager
def route(ipr: Optional[IPRoute]) -> Iterator[IPRoute]:
    """The caller's netlink socket, or one of our own for this call (opening
    one costs milliseconds: a device being bound shares one)."""
    if ipr is not None:
        yield ipr
    else:
        with IPRoute() as own:
            yield own


def link_type(idx: int, via: Optional[IPRoute] = None) -> int:
    """The device's ARPHRD_* link type (1 = Ethernet, which veth and tap are)."""
    with route(via) as ipr:
        return int(ipr.get_links(idx)[0]["ifi_type"])


def xdp_state(ipr: IPRoute, idx: int) -> tuple:
    """(attached prog id or 0, mode 1=driver 2=generic or 0)."""
    link = ipr.get_links(idx)[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return 0, 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0, xdp.get_attr("IFLA_XDP_ATTACHED") or 0


def _mode_value(mode: object) -> int:
    return {"xdp": 1, "xdpgeneric": 2, 1: 1, 2: 2}.get(mode, 0)  # type: ignore[call-overload]


def _refuse_foreign(idx: int, prog: int, ours: Set[int]) -> None:
    if prog and prog not in ours:
        raise AttachError(f"ifindex {idx} already has an XDP program (id {prog}) that sgctl "
                          "did not attach; detach it first")


def check_attachable(idx: int, ours: Set[int], via: Optional[IPRoute] = None) -> None:
    """Fail before anything changes if a foreign XDP program holds the device."""
    with route(via) as ipr:
        prog, _ = xdp_state(ipr, idx)
    _refuse_foreign(idx, prog, ours)


def attach(idx: int, xdp_fd: int, tc_fd: int, ours: Set[int],
           via: Optional[IPRoute] = None, fresh: bool = False) -> str:
    """Attach (or atomically replace) both programs on a device. Refuses to
    replace an XDP program that sgctl did not attach; an older sgctl program
    is replaced in one step, naming it as the expected one (XDP_FLAGS_REPLACE),
    so a concurrent change by someone else fails instead of being overwritten.
    The tc filter is replaced in place (same prio/handle). Returns the XDP mode.
    ``fresh``: a device that has just appeared, so nothing to replace: the
    state is not read, the kernel refuses if any program got there first
    (XDP_FLAGS_UPDATE_IF_NOEXIST)."""
    with route(via) as ipr:
        prog, mode = (0, 0) if fresh else xdp_state(ipr, idx)
        mode = _mode_value(mode)
        _refuse_foreign(idx, prog, ours)
        tried = [XDP_FLAGS_SKB_MODE] if mode == 2 else [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]
        if mode == 1:
            tried = [XDP_FLAGS_DRV_MODE]
        err: Optional[Exception] = None
        used = ""
        old_fd = bpfsys.prog_fd_by_id(prog) if prog and prog != bpfsys.prog_id(xdp_fd) else -1
        try:
            for flags in tried:
                attrs = [("IFLA_XDP_FD", xdp_fd),
                         ("IFLA_XDP_FLAGS", flags | (XDP_FLAGS_UPDATE_IF_NOEXIST if fresh else 0))]
                if old_fd >= 0:
                    attrs = [("IFLA_XDP_FD", xdp_fd), ("IFLA_XDP_EXPECTED_FD", old_fd),
                             ("IFLA_XDP_FLAGS", flags | XDP_FLAGS_REPLACE)]
                try:
                    ipr.link("set", index=idx, xdp={"attrs": attrs})
                    used = "driver" if flags == XDP_FLAGS_DRV_MODE else "generic"
                    break
                except NetlinkError as exc:
                    err = exc
        finally:
            if old_fd >= 0:
                os.close(old_fd)
        if not used:
            raise AttachError(f"ifindex {idx}: XDP attach failed: {err}")
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise AttachError(f"ifindex {idx}: clsact qdisc: {exc}") from exc
        try:
            ipr.tc("replace-filter", "bpf", idx, TC_HANDLE, fd=tc_fd, name=FILTER_NAME,
                   parent=TC_EGRESS_PARENT, prio=TC_PRIO, direct_action=True)
        except NetlinkError as exc:
            raise AttachError(f"ifindex {idx}: tc egress filter: {exc}") from exc
        return used


def detach(idx: int, ours: Set[int]) -> None:
    """Remove our programs from a device; a device that is gone is fine."""
    with IPRoute() as ipr:
        try:
            prog, mode = xdp_state(ipr, idx)
        except NetlinkError:
            return
        if prog and prog in ours:
            flags = XDP_FLAGS_SKB_MODE if _mode_value(mode) == 2 else XDP_FLAGS_DRV_MODE
            try:
                ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1),
                                                          ("IFLA_XDP_FLAGS", flags)]})
            except NetlinkError:
                pass
        try:
            ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=TC_EGRESS_PARENT, prio=TC_PRIO)
        except NetlinkError:
            pass


def attached(idx: int) -> dict:
    with IPRoute() as ipr:
        prog, mode = xdp_state(ipr, idx)
        filters = [f for f in ipr.get_filters(idx, parent=TC_EGRESS_PARENT)
                   if f.get_attr("TCA_KIND") == "bpf" and f["handle"]]
        return {"xdp_prog_id": prog, "xdp_mode": {1: "driver", 2: "generic"}.get(
            _mode_value(mode), "none"), "tc_filters": len(filters)}
