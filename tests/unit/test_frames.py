"""Frames patched in place (frames.tcp4_variant) equal frames scapy builds."""

from __future__ import annotations

import ipaddress

import pytest

from controller.kernel.frames import frame, tcp4_variant
from controller.policy.evaluator import TCP_SYN, Packet, addr


def tcp(src: str, sport: int) -> bytes:
    return frame(Packet(addr(src), addr("198.18.0.10"), 6, sport, 80, tcp_flags=TCP_SYN))


@pytest.mark.parametrize("src, sport", [("10.0.0.1", 1024), ("10.0.0.1", 65535),
                                        ("198.19.255.255", 0), ("0.0.0.1", 40000),
                                        ("255.255.255.254", 1)])
def test_a_patched_frame_is_the_frame_scapy_builds(src: str, sport: int) -> None:
    base = tcp("10.1.2.3", 5555)
    packed = ipaddress.ip_address(src).packed
    assert tcp4_variant(base, src=packed, sport=sport) == tcp(src, sport)
    assert tcp4_variant(base, sport=sport) == tcp("10.1.2.3", sport)
    assert tcp4_variant(base, src=packed) == tcp(src, 5555)
