"""1.4 allowance through real devices: a flood of forged SYNs into one
instance takes no more than its allowance of the table, and neither the
connections held on both instances nor new ones suffer
(controller/tools/synflood.py runs the scenario; this test judges it)."""

from __future__ import annotations

from controller.tools.synflood import allowance_under_flood
from tests.harness import unique

CT_MAX = 1 << 15  # the flood sends several times as many SYNs
ALLOWANCE = 2048


def test_a_syn_flood_takes_only_its_interfaces_allowance() -> None:
    got = allowance_under_flood(seconds=6, pps=40_000, ct_max=CT_MAX, allowance=ALLOWANCE,
                                tag=unique("")[-5:])
    assert got["sent"] > 4 * CT_MAX, f"the flood sent only {got['sent']} SYNs"
    assert got["allowance"] == ALLOWANCE
    assert ALLOWANCE // 2 < got["half_open_after"] <= ALLOWANCE, got  # full, and bounded
    assert got["evicted"] > got["sent"] // 2, got  # the flood reclaimed its own entries
    assert got["lost"] == [], f"held connections lost packets: {got['lost']}"
    new = {n: (v["ok"] / v["tries"], v["tries"]) for n, v in got["new"].items()}
    assert new["a"][1] > 20 and new["b"][1] > 20, new
    assert new["b"][0] >= 0.99, new
    assert new["a"][0] >= 0.90, new
