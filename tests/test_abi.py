"""The C header and the Python mirror must agree (libbpf-bootstrap habit):
struct layouts against the ctypes bcc derives from bpf/lib/types.h, and the
reason enum against bpf/lib/reasons.h."""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

import pytest

from controller import abi
from controller.reasons import REASON_MAX, Reason

ROOT = Path(__file__).resolve().parent.parent


def test_reasons_match_header() -> None:
    text = (ROOT / "bpf" / "lib" / "reasons.h").read_text()
    header = {m.group(1): int(m.group(2)) for m in re.finditer(r"SG_(\w+)\s*=\s*(\d+),", text)}
    assert header == {r.name: r.value for r in Reason}
    assert f"#define SG_REASON_MAX {REASON_MAX}" in text


def test_timeouts_order_matches_header() -> None:
    text = (ROOT / "bpf" / "lib" / "types.h").read_text()
    names = re.findall(r"SG_TO_(\w+)\s*=\s*\d+,", text)
    assert [n.lower() for n in names if n != "MAX"] == list(abi.TO_NAMES)


def test_constants_match_header() -> None:
    text = (ROOT / "bpf" / "lib" / "types.h").read_text()
    header = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define SG_(\w+)\s+(\d+)", text)}
    for name in ("CT_NEW", "CT_ESTABLISHED", "CT_STREAM", "CT_CLOSING", "DIR_INGRESS", "DIR_EGRESS"):
        assert header[name] == getattr(abi, name), name


def layout(t: type) -> list:
    if not (isinstance(t, type) and issubclass(t, ct.Structure)):
        return [ct.sizeof(t)]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.mark.kernel
def test_struct_layouts_match_bcc(kernel) -> None:
    bcc = kernel.dp._bcc
    for name, (key_t, val_t) in abi.MAPS.items():
        table = bcc[name.encode()]
        leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU maps: one CPU's value
        assert ct.sizeof(table.Key) == ct.sizeof(key_t), f"{name} key size"
        assert ct.sizeof(leaf) == ct.sizeof(val_t), f"{name} value size"
        for mine, theirs in ((key_t, table.Key), (val_t, leaf)):
            if issubclass(mine, ct.Structure):
                assert layout(mine) == layout(theirs), name
