"""Small policies used by the kernel and evaluator tests (native format)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from controller.policy.formats import load_document
from controller.policy.model import State


def one_interface(ingress: Optional[List[dict]] = None, egress: Optional[List[dict]] = None,
                  device: str = "lo", mode: str = "workload", extra_groups: Optional[dict] = None,
                  eni_groups: Optional[List[str]] = None, others: Optional[dict] = None,
                  prefix_lists: Optional[dict] = None, settings: Optional[dict] = None,
                  ipv6: bool = True, timeouts: Optional[dict] = None,
                  eni: Optional[dict] = None) -> State:
    """eni-a (198.18.0.10, 2001:db8::10) bound to ``device`` with group sg-a;
    ``eni``: more of its fields (source_dest_check, mac_address, ...)."""
    group: Dict[str, Any] = {"name": "a", "ingress": ingress or []}
    if egress is not None:
        group["egress"] = egress
    iface: Dict[str, Any] = {"groups": eni_groups or ["sg-a"], "ipv4": ["198.18.0.10"],
                             "device": device, "mode": mode, **(eni or {})}
    if ipv6:
        iface["ipv6"] = ["2001:db8::10"]
    if timeouts:
        iface["timeouts"] = timeouts
    doc: Dict[str, Any] = {"sgctl": 1, "groups": {"sg-a": group, **(extra_groups or {})},
                           "interfaces": {"eni-a": iface, **(others or {})}}
    if prefix_lists:
        doc["prefix_lists"] = prefix_lists
    if settings:
        doc["settings"] = settings
    return load_document(doc)
