"""The C header and the Python mirror must agree (libbpf-bootstrap habit):
struct layouts against the ctypes bcc derives from bpf/lib/types.h, and the
reason enum against bpf/lib/reasons.h."""

from __future__ import annotations

import ctypes as ct
import os
import re
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest

from controller import abi
from controller.abi.reasons import REASON_MAX, Reason
from controller.kernel import build
from controller.kernel.dataplane import program_source

ROOT = Path(__file__).resolve().parents[2]


def test_reasons_match_header() -> None:
    text = (ROOT / "bpf" / "lib" / "reasons.h").read_text()
    header = {m.group(1): int(m.group(2)) for m in re.finditer(r"SG_(\w+)\s*=\s*(\d+),", text)}
    assert header == {r.name: r.value for r in Reason}
    assert f"#define SG_REASON_MAX {REASON_MAX}" in text


def test_timeouts_order_matches_header() -> None:
    text = (ROOT / "bpf" / "lib" / "types.h").read_text()
    names = re.findall(r"SG_TO_(\w+)\s*=\s*\d+,", text)
    assert [n.lower() for n in names if n != "MAX"] == list(abi.TO_NAMES)


def header_defines() -> dict:
    """Every numeric ``#define SG_X value`` of bpf/lib/*.h."""
    out = {}
    for path in sorted((ROOT / "bpf" / "lib").glob("*.h")):
        for m in re.finditer(r"#define SG_(\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)(?:\s*<<\s*(\d+))?\)?",
                             path.read_text()):
            out[m.group(1)] = int(m.group(2), 0) << int(m.group(3) or 0)
    return out


def test_every_constant_matches_the_headers() -> None:
    """Each integer constant of the mirror equals the header's SG_ define of
    the same name (types.h, maps.h, ...): the facts are defined in C and
    checked here, never copied unchecked."""
    header = header_defines()
    mirrored = {name: value for name, value in vars(abi).items()
                if name.isupper() and isinstance(value, int) and name in header}
    for name, value in mirrored.items():
        assert header[name] == value, f"abi.{name} = {value}, bpf/lib says {header[name]}"
    assert {"CT_NEW", "DIR_EGRESS", "PROTO_ANY", "FLAG_WORLD", "CHAIN_MAX", "SEGS_INLINE",
            "PLEN_SLOTS", "COUNTER_SLOTS", "RULE_SLOTS", "CFG_FLOW_LOG", "EP_MAC",
            "CT_F_DHCP", "LOCAL_ONLINK64", "REASON_MAX"} <= set(mirrored), sorted(mirrored)


def layout(t: type) -> list:
    if not (isinstance(t, type) and issubclass(t, ct.Structure)):
        return [ct.sizeof(t)]
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.fixture(scope="module")
def compiled(_kernel_session) -> Iterator[Tuple[build.Build, Any]]:
    """A fresh compile (not the cached build the session loaded)."""
    b, bcc = build.compile_build(program_source(), _kernel_session.dp.cflags())
    try:
        yield b, bcc
    finally:
        bcc.cleanup()


@pytest.mark.kernel
def test_struct_layouts_match_bcc(compiled) -> None:
    bcc = compiled[1]
    for name, (key_t, val_t) in abi.MAPS.items():
        table = bcc[name.encode()]
        leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU maps: one CPU's value
        assert ct.sizeof(table.Key) == ct.sizeof(key_t), f"{name} key size"
        assert ct.sizeof(leaf) == ct.sizeof(val_t), f"{name} value size"
        for mine, theirs in ((key_t, table.Key), (val_t, leaf)):
            if issubclass(mine, ct.Structure):
                assert layout(mine) == layout(theirs), name


@pytest.mark.kernel
def test_the_cached_build_is_what_a_compile_gives(kernel, compiled) -> None:
    """The build the session loaded (from the cache when one was there) has
    the maps and the instructions of a fresh compile, map fds aside."""
    fresh = compiled[0]
    cached = build.cached_build(program_source(), kernel.dp.cflags(), kernel.dp.cache_dir)
    assert cached.key == fresh.key and cached.maps == fresh.maps
    assert {m.name for m in fresh.maps.values() if m.pinned} == set(abi.MAPS) | set(abi.RING_MAPS)

    def without_fds(p: build.ProgSpec) -> bytes:
        insns = bytearray(p.insns)
        for i, _ in p.relocs:
            insns[i * build.INSN + 4:i * build.INSN + 8] = bytes(4)
        return bytes(insns)

    for name in build.PROGRAMS:
        assert cached.progs[name].relocs == fresh.progs[name].relocs
        assert without_fds(cached.progs[name]) == without_fds(fresh.progs[name])


@pytest.mark.kernel
def test_ring_record_layout_matches_bcc(kernel) -> None:
    """Ring buffers have no value type for bcc to derive: the record struct
    goes through a one-slot array compiled from the same header."""
    from bcc import BPF

    assert set(abi.RING_MAPS) == {"sg_flow_events"}
    text = (f'#include <uapi/linux/bpf.h>\n#include "{ROOT / "bpf" / "lib" / "types.h"}"\n'
            "BPF_ARRAY(probe, struct sg_flow_event, 1);\n")
    b = BPF(text=text.encode())
    try:
        assert layout(abi.RING_MAPS["sg_flow_events"]) == layout(b[b"probe"].Leaf)
    finally:
        b.cleanup()
    maps_h = (ROOT / "bpf" / "lib" / "maps.h").read_text()
    assert 'SG_PIN_DIR "/sg_flow_events"' in maps_h


@pytest.mark.kernel
def test_pinned_map_of_an_older_layout_is_replaced(tmp_path) -> None:
    """An upgrade that changes a struct: the old pin (here a conntrack map
    with 24-byte values) is dropped and the build creates the new layout,
    instead of failing to load or sharing a map of the wrong shape."""
    from controller.kernel import bpfsys
    from controller.kernel.dataplane import Dataplane
    from tests.harness import unique

    pin_dir = f"/sys/fs/bpf/{unique('sgabi')}"
    dp = Dataplane(pin_dir=pin_dir, ct_max=1024)
    try:
        dp.ensure_bpffs()
        create = bpfsys.lib().bpf_map_create
        create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                           ct.c_void_p]
        fd = create(1, b"sg_conntrack", ct.sizeof(abi.CtKey), 24, 1024, None)  # BPF_MAP_TYPE_HASH
        assert fd >= 0
        bpfsys.obj_pin(fd, f"{pin_dir}/sg_conntrack")
        os.close(fd)
        dp.programs()
        assert dp.map("sg_conntrack").sizes == (ct.sizeof(abi.CtKey), ct.sizeof(abi.CtEntry))
    finally:
        dp.remove_pins()


def test_array_range_reads_what_lookups_read(kernel) -> None:
    """The batch read the metrics use agrees with one lookup per index, for
    a range at 0 and ranges further in (the batch token is the previous key)."""
    m = kernel.dp.map("sg_verdicts")
    marks = {0: 3, 1: 5, 63: 7, 64: 11, 65: 13, 200: 17}
    try:
        for i, n in marks.items():
            vals = (abi.Counter * m.ncpu)()
            vals[0].packets, vals[0].bytes = n, n * 100
            m.update(ct.c_uint32(i), vals)
        for start, count in ((0, 64), (64, 64), (1, 3), (190, 20)):
            got = [sum(v.packets for v in cpus) for cpus in m.array_range(start, count)]
            want = [sum(v.packets for v in m.lookup(ct.c_uint32(i)))
                    for i in range(start, start + count)]
            assert got == want and any(got), (start, count)
    finally:
        for i in marks:
            m.update(ct.c_uint32(i), (abi.Counter * m.ncpu)())
