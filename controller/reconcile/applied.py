"""What the reconciler last wrote to the kernel (its memory across
processes: ``<state-dir>/applied.json``), as typed records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

WorldKey = Tuple[int, int]  # (direction index, address family)


@dataclass
class EndpointRecord:
    """A bound device: its endpoint id and the policy it points at."""
    ifindex: int
    ep_id: int
    device: Optional[str]
    mode: str
    policy: str  # the group set, "sg-a,sg-b"
    own: List[str]  # the interface's own addresses when bound
    check: bool  # source/destination check
    xdp_mode: Optional[str] = None  # "drv" or "skb", once attached here
    ring: Tuple[int, int] = (0, 0)  # its half-open allowance: (first slot, slots)
    ct_limit: int = 0  # connections it may hold in all (0: no limit)

    def as_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class PolicyRecord:
    """A group set's policy ids: the active one the endpoints use and the
    inactive one (the version before), and what its image holds."""

    active: int
    ids: List[int]  # active first
    fingerprint: str
    open_all: int
    world: Dict[WorldKey, int]  # -> world class id
    peers: int = 0
    classes: int = 0
    written: int = 0  # map entries the last write changed

    def as_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["world"] = {f"{d},{fam}": c for (d, fam), c in self.world.items()}
        return out

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> PolicyRecord:
        world = {}
        for key, c in raw.get("world", {}).items():
            d, fam = key.split(",")
            world[(int(d), int(fam))] = int(c)
        return cls(active=int(raw["active"]), ids=[int(i) for i in raw["ids"]],
                   fingerprint=str(raw["fingerprint"]), open_all=int(raw["open_all"]),
                   world=world, peers=int(raw.get("peers", 0)),
                   classes=int(raw.get("classes", 0)), written=int(raw.get("written", 0)))


@dataclass
class InterfaceSummary:
    """What ``sgctl status`` shows of an interface this host binds."""

    device: Optional[str]
    mode: str
    groups: List[str]
    rules_ingress: int
    rules_egress: int
    policy_id: int
    addresses: List[str]
    source_dest_check: bool
    pending: bool  # its device does not exist (yet)

    def as_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Applied:
    endpoints: Dict[str, EndpointRecord] = field(default_factory=dict)  # by eni id
    policies: Dict[str, PolicyRecord] = field(default_factory=dict)  # by group set
    next_policy_id: int = 1
    rule_index: Dict[str, int] = field(default_factory=dict)  # rule id -> kernel rule number
    next_rule_index: int = 1
    next_class_id: int = 1
    prog_ids: List[int] = field(default_factory=list)
    summary: Dict[str, InterfaceSummary] = field(default_factory=dict)  # by eni id
    desired: Optional[Dict[str, Any]] = None  # settings and stale rules (the CLI: everything)

    def as_json(self) -> Dict[str, Any]:
        return {"endpoints": {e: r.as_json() for e, r in self.endpoints.items()},
                "policies": {p: r.as_json() for p, r in self.policies.items()},
                "next_policy_id": self.next_policy_id, "rule_index": self.rule_index,
                "next_rule_index": self.next_rule_index, "next_class_id": self.next_class_id,
                "prog_ids": self.prog_ids,
                "summary": {e: s.as_json() for e, s in self.summary.items()},
                "desired": self.desired}

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> Applied:
        """Raises KeyError/TypeError/ValueError on a record it cannot read
        (the caller then starts from nothing). Policies of the oldest format
        (one id, no "active") are left out: they are rewritten."""
        return cls(
            endpoints={e: EndpointRecord(**{**r, "ring": tuple(r.get("ring", (0, 0)))})
                       for e, r in raw.get("endpoints", {}).items()},
            policies={p: PolicyRecord.from_json(r) for p, r in raw.get("policies", {}).items()
                      if "active" in r},
            next_policy_id=int(raw.get("next_policy_id", 1)),
            rule_index={str(k): int(v) for k, v in raw.get("rule_index", {}).items()},
            next_rule_index=int(raw.get("next_rule_index", 1)),
            next_class_id=int(raw.get("next_class_id", 1)),
            prog_ids=[int(i) for i in raw.get("prog_ids", [])],
            summary={e: InterfaceSummary(**s) for e, s in raw.get("summary", {}).items()},
            desired=raw.get("desired"))

    def find_endpoint(self, name: str) -> Optional[EndpointRecord]:
        """The bound endpoint of an interface, named by eni- id or device."""
        ep = self.endpoints.get(name)
        return ep or next((e for e in self.endpoints.values() if e.device == name), None)
