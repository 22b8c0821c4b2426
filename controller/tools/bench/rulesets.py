"""The rule sets every scenario measures: sgctl's (random CIDR/port rules)
and the same rules as iptables and nftables see them."""

from __future__ import annotations

import ipaddress
import random
import subprocess
from typing import Any, Dict, List, Optional


def rules(n: int, seed: int = 1, nested: bool = False) -> List[Dict[str, Any]]:
    """n distinct TCP rules with mixed CIDRs (70% /32, 25% /24, 5% /16 in
    10.0.0.0/8) and port ranges. ``nested``: prefix lengths from /8 to /32
    all inside 10.0.0.0/8, the worst case for the peer-class compiler."""
    rnd = random.Random(seed)
    out: List[Dict[str, Any]] = []
    seen: set = set()
    while len(out) < n:
        if nested:
            plen = rnd.choice((8, 16, 20, 24, 28, 32))
        else:
            plen = rnd.choices((32, 24, 16), (70, 25, 5))[0]
        net = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}/{plen}"
        lo = rnd.randrange(1, 60000)
        hi = lo + rnd.choice((0, 0, 1, 10, 100))
        key = (net, lo, hi)
        if key in seen:
            continue
        seen.add(key)
        out.append({"proto": "tcp", "ports": f"{lo}-{hi}", "from": net})
    return out


def sh(*cmd: str, check: bool = True, inp: Optional[str] = None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, input=inp)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def iptables_rules(rs: List[Dict[str, Any]], dev: str) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]",
             f"-A INPUT -i {dev} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    for r in rs:
        lo, _, hi = str(r["ports"]).partition("-")
        lines.append(f"-A INPUT -i {dev} -s {r['from']} -p tcp --dport {lo}:{hi or lo} -j ACCEPT")
    lines += [f"-A INPUT -i {dev} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


NFT_CHUNK = 500  # elements per nft transaction (one netlink message must hold them)


def nft_elements(rs: List[Dict[str, Any]], dev: str) -> List[str]:
    """nft commands for the rules: (address . port range) elements of one
    interval set; a rule overlapping one already in the set (nft refuses
    overlapping elements) becomes a plain rule in chain ``extra``."""
    placed: Dict[Any, List[Any]] = {}  # network -> port ranges in the set
    below: Dict[Any, List[Any]] = {}  # (plen, supernet) -> placed networks inside it
    plens = sorted({ipaddress.ip_network(r["from"], strict=False).prefixlen for r in rs})
    elems, plain = [], []
    for r in rs:
        net = ipaddress.ip_network(r["from"], strict=False)
        lo_s, _, hi_s = str(r["ports"]).partition("-")
        lo, hi = int(lo_s), int(hi_s or lo_s)
        around = [net.supernet(new_prefix=p) for p in plens if p < net.prefixlen] + [net]
        inside = below.get((net.prefixlen, net), [])
        if any(a <= hi and lo <= b for n in around + inside for a, b in placed.get(n, [])):
            plain.append(f"add rule inet sgbench extra ip saddr {net} tcp dport {lo}-{hi} "
                         "counter accept")
            continue
        placed.setdefault(net, []).append((lo, hi))
        for p in plens:
            if p < net.prefixlen:
                below.setdefault((p, net.supernet(new_prefix=p)), []).append(net)
        elems.append(f"{net} . {lo}-{hi}")
    cmds = ["add element inet sgbench allow4 { " + ", ".join(elems[i:i + NFT_CHUNK]) + " }"
            for i in range(0, len(elems), NFT_CHUNK)]
    return cmds + ["\n".join(plain[i:i + NFT_CHUNK]) for i in range(0, len(plain), NFT_CHUNK)]


def nft_rules(dev: str) -> str:
    return f"""table inet sgbench {{
  set allow4 {{
    type ipv4_addr . inet_service; flags interval;
  }}
  chain extra {{
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{dev}" ct state established,related counter accept
    iifname "{dev}" ip saddr . tcp dport @allow4 counter accept
    iifname "{dev}" jump extra
    iifname "{dev}" counter drop
  }}
}}
"""
