"""`make bench` / `make bench-full`: run every scenario, write BENCHMARKS.md,
docs/bench/results.json and the plots (python -m controller.bench [--full]
[--smoke] [--out DIR]). Ratios are computed within one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

from controller.tools.bench import control, device, fleet, on_sigterm, packet, report, tcp
from controller.tools.synflood import allowance_under_flood

FLOOD_CT_MAX = 1 << 16  # the SYN flood scenario's table: the flood sends many times this

ROOT = Path(__file__).resolve().parents[3]

# (per-packet sizes, conntrack sizes, repeat, runs, new flows, device packets,
#  iperf seconds and rounds, control sizes, control samples, YAML document sizes)
PROFILES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(sizes=[10, 100], ct=[1000], repeat=2000, runs=2, new=50,
                  dev_packets=20000, dev_sizes=[10], dev_s=1, tcp_s=1, tcp_rounds=1, tcp_flood=False,
                  ctl_sizes=[10], ctl_samples=4, yaml_sizes=[1000], fleet_samples=5,
                  fleet_sizes=[1000], flood_s=5),
    "quick": dict(sizes=[10, 100, 1000, 10000], ct=[1000, 1000000], repeat=100000, runs=5,
                  new=2000, dev_packets=2000000, dev_sizes=[10000], dev_s=3, tcp_s=2, tcp_rounds=1,
                  tcp_flood=True, ctl_sizes=[10, 10000], ctl_samples=20, yaml_sizes=[10000],
                  fleet_samples=50, fleet_sizes=[1000, 100000], flood_s=30),
    "full": dict(sizes=[10, 100, 1000, 10000], ct=[1000, 1000000], repeat=1000000, runs=7,
                 new=10000, dev_packets=10000000, dev_sizes=[10, 1000, 10000], dev_s=10, tcp_s=10,
                 tcp_rounds=3, tcp_flood=True, ctl_sizes=[10, 1000, 10000], ctl_samples=100,
                 yaml_sizes=[10000, 100000], fleet_samples=200,
                 fleet_sizes=[1000, 10000, 100000], flood_s=60),
}


def machine() -> Dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                         if ln.startswith("model name")), "?"),
            "mitigations": mitigations()}


def mitigations() -> str:
    """The kernel's speculative-execution mitigations (what test runs pay for)."""
    base = Path("/sys/devices/system/cpu/vulnerabilities")
    try:
        return "; ".join(f"{f.name}: {f.read_text().strip()}" for f in sorted(base.iterdir()))
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.bench")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--out", default=str(ROOT), help="where BENCHMARKS.md and docs/bench/ go")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))  # let each scenario clean up
    p = PROFILES[args.profile]
    res: Dict[str, Any] = {"machine": machine(), "profile": args.profile}
    steps = [
        ("per_packet", lambda: packet.run(p["sizes"], p["ct"], p["repeat"], p["runs"], p["new"])),
        ("device", lambda: device.run(p["dev_packets"], p["dev_sizes"], p["dev_s"])),
        ("tcp", lambda: tcp.run(p["tcp_s"], 10, p["tcp_flood"], p["tcp_rounds"])),
        ("control", lambda: control.run(p["ctl_sizes"], p["ctl_samples"], p["yaml_sizes"])),
        ("fleet", lambda: fleet.run(p["fleet_samples"], p["fleet_sizes"])),
        ("flood", lambda: allowance_under_flood(p["flood_s"], 0, FLOOD_CT_MAX, 0,
                                                f"{os.getpid() % 100000}")),
    ]
    for name, fn in steps:
        start = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        res[name] = fn()
        print(f"bench: {name} done in {time.monotonic() - start:.0f} s", file=sys.stderr)
    out = Path(args.out)
    (out / "docs" / "bench").mkdir(parents=True, exist_ok=True)
    (out / "docs" / "bench" / "results.json").write_text(json.dumps(res, indent=1))
    report.write(res, out)
    print(f"bench: wrote {out / 'BENCHMARKS.md'} and {out / 'docs' / 'bench'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
