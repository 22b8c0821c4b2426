"""A fast run of the benchmark code (the smoke profile): every scenario runs
and reports numbers; no timing is asserted (that is `make bench`'s job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_profile_produces_a_report(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "controller.tools.bench", "--profile", "smoke",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "docs" / "bench" / "results.json").read_text())
    per = data["per_packet"]["by_rules"]
    assert [r["rules"] for r in per] == [10, 100]
    assert all(r["empty"] > 0 and r["established"] > 0 and r["denied"] > 0 for r in per)
    sc = data["per_packet"]["source_check"]
    assert all(sc[f"{w}_{k}"] > 0 for w in ("established", "new") for k in ("on", "off"))
    fl = data["per_packet"]["flow_logs"]
    assert fl["rules"] == 100 and all(fl[k] > 0 for k in ("established", "denied_sent",
                                                          "denied_limited", "new"))
    rates = {(r["filter"], r["traffic"]) for r in data["device"]["rates"]}
    assert {("xdp_drop", "denied"), ("sgctl", "denied"), ("sgctl", "allowed"),
            ("iptables", "denied"), ("nftables", "denied")} <= rates
    sg = next(r for r in data["device"]["rates"] if r["filter"] == "sgctl"
              and r["traffic"] == "denied")
    assert sg["pps"] > 0, "the generator's frames reached sgctl's program"
    assert {r["filter"] for r in data["tcp"]["throughput"]} == {
        "none", "sgctl", "sgctl+flowlogs", "iptables", "nftables"}
    assert all(r["gbps"] > 0 for r in data["tcp"]["throughput"])
    assert data["control"]["rule_change"][0]["samples"] == 4
    assert data["control"]["ec2_rule_change"]["median_ms"] > 0  # boto3 through the endpoint
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets" in text and "| established <= 5x empty program |" in text
    assert "### With flow logs on (100 rules)" in text
    for png in ("per_packet.png", "device.png", "tcp.png"):
        assert (tmp_path / "docs" / "bench" / png).stat().st_size > 1000
    leftovers = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "sgdv" not in leftovers and "sgtb" not in leftovers, "bench links left behind"
