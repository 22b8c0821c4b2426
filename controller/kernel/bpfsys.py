"""Thin ctypes layer over the system libbpf (libbpf1): pinned objects, map
operations and BPF_PROG_TEST_RUN. No compilation here; see dataplane.py."""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple, Type

_lib: Optional[ct.CDLL] = None


def lib() -> ct.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        _lib = ct.CDLL(name, use_errno=True)
        _lib.bpf_obj_get.argtypes = [ct.c_char_p]
        _lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        for fn in ("bpf_map_update_elem",):
            getattr(_lib, fn).argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        for fn in ("bpf_map_lookup_elem", "bpf_map_get_next_key"):
            getattr(_lib, fn).argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
        _lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.c_void_p]
        _lib.libbpf_num_possible_cpus.argtypes = []
    return _lib


class BpfError(OSError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ct.get_errno() or -rc
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def _obj_info(fd: int, size: int) -> bytes:
    """The head (``size`` bytes) of a program's or map's struct bpf_*_info."""
    info = ct.create_string_buffer(size)
    n = ct.c_uint32(size)
    fn = lib().bpf_obj_get_info_by_fd
    fn.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    _check(fn(fd, info, ct.byref(n)), "bpf_obj_get_info_by_fd")
    return info.raw


def prog_id(fd: int) -> int:
    """The kernel id of a loaded program (struct bpf_prog_info.id)."""
    return int.from_bytes(_obj_info(fd, 256)[4:8], "little")


PROG_INFO_VERIFIED_INSNS = 216  # offset of struct bpf_prog_info.verified_insns (Linux 5.16+)
VERIFIER_INSN_BUDGET = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: past it a program does not load


def prog_verified_insns(fd: int) -> int:
    """How many instructions the verifier walked to accept the program."""
    raw = _obj_info(fd, 256)
    return int.from_bytes(raw[PROG_INFO_VERIFIED_INSNS:PROG_INFO_VERIFIED_INSNS + 4], "little")


def prog_fd_by_id(prog: int) -> int:
    fn = lib().bpf_prog_get_fd_by_id
    fn.argtypes = [ct.c_uint32]
    return _check(fn(prog), f"bpf_prog_get_fd_by_id({prog})")


def num_cpus() -> int:
    return int(lib().libbpf_num_possible_cpus())


BPF_ANY = 0  # map update flags: create or replace
ENOTSUPP = 524  # the kernel's "operation not supported" (not in errno)


class Map:
    """A map opened from its pin, with typed keys and values."""

    def __init__(self, path: str, key_t: Type, val_t: Type, percpu: bool = False) -> None:
        self.path = path
        self.fd = obj_get(path)
        self.key_t = key_t
        self.val_t = val_t
        self.percpu = percpu
        self.ncpu = num_cpus() if percpu else 1

    @property
    def max_entries(self) -> int:
        return map_info(self.fd).max_entries

    @property
    def sizes(self) -> Tuple[int, int]:
        """(key_size, value_size) of the map as the kernel has it."""
        info = map_info(self.fd)
        return info.key_size, info.value_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mapped_words(self) -> MappedWords:
        """This array map (created BPF_F_MMAPABLE, 8-byte values) mapped
        into this process."""
        return MappedWords(self)

    def update(self, key: Any, val: Any, flags: int = BPF_ANY) -> None:
        _check(lib().bpf_map_update_elem(self.fd, ct.byref(key), ct.byref(val), flags),
               f"update {os.path.basename(self.path)}")

    def lookup(self, key: Any) -> Any:
        val = (self.val_t * self.ncpu)() if self.percpu else self.val_t()
        rc = lib().bpf_map_lookup_elem(self.fd, ct.byref(key), ct.byref(val))
        if rc < 0:
            if ct.get_errno() == errno.ENOENT:
                return None
            _check(rc, f"lookup {os.path.basename(self.path)}")
        return val

    def delete(self, key: Any) -> bool:
        rc = lib().bpf_map_delete_elem(self.fd, ct.byref(key))
        if rc < 0:
            if ct.get_errno() == errno.ENOENT:
                return False
            _check(rc, f"delete {os.path.basename(self.path)}")
        return True

    def keys(self) -> List[Any]:
        out: List[Any] = []
        cur: Any = None
        while True:
            nxt = self.key_t()
            rc = lib().bpf_map_get_next_key(self.fd, None if cur is None else ct.byref(cur),
                                            ct.byref(nxt))
            if rc < 0:
                if ct.get_errno() == errno.ENOENT:
                    return out
                _check(rc, f"iterate {os.path.basename(self.path)}")
            out.append(nxt)
            cur = nxt

    def update_batch(self, keys: List[Any], vals: List[Any]) -> None:
        """Many updates in one BPF_MAP_UPDATE_BATCH (hash maps); per element
        where the map type has no batch operation."""
        if not keys:
            return
        karr = (self.key_t * len(keys))(*keys)
        varr = (self.val_t * len(vals))(*vals)
        fn = lib().bpf_map_update_batch
        fn.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        count = ct.c_uint32(len(keys))
        rc = fn(self.fd, karr, varr, ct.byref(count), None)
        if rc < 0 and ct.get_errno() in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
            for k, v in zip(keys, vals):
                self.update(k, v)
            return
        _check(rc, f"batch update {os.path.basename(self.path)} ({count.value}/{len(keys)} done)")

    def delete_many(self, keys: List[Any]) -> int:
        """Delete keys (BPF_MAP_DELETE_BATCH where possible); missing ones are
        fine. Returns how many there were."""
        return len(self.delete_keys(keys))

    def delete_keys(self, keys: List[Any]) -> List[Any]:
        """``delete_many``, returning the keys that were there."""
        if not keys:
            return []
        karr = (self.key_t * len(keys))(*keys)
        fn = lib().bpf_map_delete_batch
        fn.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        count = ct.c_uint32(len(keys))
        if fn(self.fd, karr, ct.byref(count), None) == 0:
            return list(keys)
        # a missing key stops the batch (ENOENT) or the map has no batch op: one by
        # one from there (the batch's count is of the keys it deleted)
        done = count.value
        return list(keys[:done]) + [k for k in keys[done:] if self.delete(k)]

    def batch_items(self, chunk: int = 4096) -> Iterator[Tuple[Any, Any]]:
        """All entries with BPF_MAP_LOOKUP_BATCH: one syscall per ``chunk``
        entries instead of two per entry (hash maps only)."""
        fn = lib().bpf_map_lookup_batch
        fn.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                       ct.POINTER(ct.c_uint32), ct.c_void_p]
        keys = (self.key_t * chunk)()
        vals = (self.val_t * chunk)()
        tok_in, tok_out = ct.create_string_buffer(64), ct.create_string_buffer(64)
        first = True
        while True:
            count = ct.c_uint32(chunk)
            rc = fn(self.fd, None if first else tok_in, tok_out, keys, vals, ct.byref(count), None)
            err = ct.get_errno() if rc < 0 else 0
            if rc < 0 and err != errno.ENOENT:
                _check(rc, f"batch lookup {os.path.basename(self.path)}")
            for i in range(count.value):
                yield self.key_t.from_buffer_copy(keys[i]), self.val_t.from_buffer_copy(vals[i])
            if rc < 0:  # ENOENT: that was the last batch
                return
            ct.memmove(tok_in, tok_out, 64)
            first = False

    def array_range(self, start: int, count: int) -> List[Any]:
        """Values ``start .. start+count-1`` of an array map in one
        BPF_MAP_LOOKUP_BATCH;
        per-CPU values come as one array of ``ncpu`` values each."""
        vt = self.val_t * self.ncpu if self.percpu else self.val_t
        count = max(0, min(count, self.max_entries - start))
        if count == 0:
            return []
        fn = lib().bpf_map_lookup_batch
        fn.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                       ct.POINTER(ct.c_uint32), ct.c_void_p]
        keys = (ct.c_uint32 * count)()
        vals = (vt * count)()
        # the batch starts after the key in in_batch (the generic walk's
        # "previous key"): none for index 0, start - 1 otherwise
        tok_in, tok_out = ct.c_uint32(max(start - 1, 0)), ct.c_uint32(0)
        n = ct.c_uint32(count)
        rc = fn(self.fd, ct.byref(tok_in) if start else None, ct.byref(tok_out), keys, vals,
                ct.byref(n), None)
        if rc < 0 and ct.get_errno() != errno.ENOENT:
            _check(rc, f"batch lookup {os.path.basename(self.path)}")
        return list(vals[:n.value])

    def items(self) -> Iterator[Tuple[Any, Any]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v


class TestRunOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


class XdpMd(ct.Structure):
    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff)
SKB_IFINDEX_OFFSET = 40


BPF_F_TEST_XDP_LIVE_FRAMES = 2


def test_run(prog_fd: int, frame: bytes, ifindex: int, xdp: bool,
             repeat: int = 1, live: bool = False) -> Tuple[int, int]:
    """BPF_PROG_TEST_RUN one frame as if received (XDP) or sent (tc) on ifindex.
    Returns (program return value, mean duration in ns). ``live``: XDP only,
    the frames really go where the program sends them (XDP_TX: out of
    ``ifindex``), ``repeat`` times -- a traffic generator."""
    data = ct.create_string_buffer(frame, len(frame))
    out = ct.create_string_buffer(len(frame) + 512)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.cast(data, ct.c_void_p),
                       data_out=None if live else ct.cast(out, ct.c_void_p),
                       data_size_in=len(frame), data_size_out=0 if live else len(out),
                       repeat=repeat, flags=BPF_F_TEST_XDP_LIVE_FRAMES if live else 0)
    if xdp:
        ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ifindex)
        ctx_buf: ct.Array = ct.create_string_buffer(bytes(ctx), ct.sizeof(ctx))
    else:
        raw = bytearray(SKB_CTX_SIZE)
        raw[SKB_IFINDEX_OFFSET:SKB_IFINDEX_OFFSET + 4] = ifindex.to_bytes(4, "little")
        ctx_buf = ct.create_string_buffer(bytes(raw), len(raw))
    opts.ctx_in = ct.cast(ctx_buf, ct.c_void_p)
    opts.ctx_size_in = len(ctx_buf)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return int(opts.retval), int(opts.duration)


RingCallback = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class Ring:
    """A pinned BPF ring buffer, read with libbpf's ring_buffer__consume:
    ``on_record`` gets each record as an instance of ``rec_t``."""

    def __init__(self, path: str, on_record: Any, rec_t: Type) -> None:
        lb = lib()
        lb.ring_buffer__new.restype = ct.c_void_p
        lb.ring_buffer__new.argtypes = [ct.c_int, RingCallback, ct.c_void_p, ct.c_void_p]
        lb.ring_buffer__consume.argtypes = [ct.c_void_p]
        lb.ring_buffer__free.argtypes = [ct.c_void_p]
        self.fd = obj_get(path)
        size = ct.sizeof(rec_t)

        def sample(_ctx: Any, data: int, n: int) -> int:
            if n >= size:
                on_record(rec_t.from_buffer_copy(ct.string_at(data, size)))
            return 0

        self._cb = RingCallback(sample)  # kept: libbpf holds the pointer
        self.rb = lb.ring_buffer__new(self.fd, self._cb, None, None)
        if not self.rb:
            os.close(self.fd)
            raise BpfError(ct.get_errno(), f"ring_buffer__new {path}")

    def consume(self) -> int:
        """Every record ready now; returns how many."""
        return _check(lib().ring_buffer__consume(self.rb), "ring_buffer__consume")

    def close(self) -> None:
        if self.rb:
            lib().ring_buffer__free(self.rb)
            self.rb = None
            os.close(self.fd)


class _MapCreateOpts(ct.Structure):  # struct bpf_map_create_opts (libbpf 1.x), the part we use
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("map_extra", ct.c_uint64), ("numa_node", ct.c_uint32),
                ("map_ifindex", ct.c_uint32)]


BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS = 2, 6, 12


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says a map is (the head of struct bpf_map_info)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = _obj_info(fd, 128)
    t, mid, key, value, entries, flags = (int.from_bytes(raw[i:i + 4], "little")
                                          for i in range(0, 24, 4))
    return MapInfo(t, mid, key, value, entries, flags, raw[24:40].split(b"\0", 1)[0].decode())


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int) -> int:
    """A new map (no BTF); returns its fd."""
    create = lib().bpf_map_create
    create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(create(map_type, name.encode(), key_size, value_size, max_entries,
                         ct.byref(opts)), f"create map {name}")


class _ProgLoadOpts(ct.Structure):  # struct bpf_prog_load_opts as of libbpf 1.1 (ends at log_buf)
    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int),
                ("expected_attach_type", ct.c_uint32), ("prog_btf_fd", ct.c_uint32),
                ("prog_flags", ct.c_uint32), ("prog_ifindex", ct.c_uint32),
                ("kern_version", ct.c_uint32), ("attach_btf_id", ct.c_uint32),
                ("attach_prog_fd", ct.c_uint32), ("attach_btf_obj_fd", ct.c_uint32),
                ("fd_array", ct.c_void_p), ("func_info", ct.c_void_p),
                ("func_info_cnt", ct.c_uint32), ("func_info_rec_size", ct.c_uint32),
                ("line_info", ct.c_void_p), ("line_info_cnt", ct.c_uint32),
                ("line_info_rec_size", ct.c_uint32), ("log_level", ct.c_uint32),
                ("log_size", ct.c_uint32), ("log_buf", ct.c_void_p)]


VERIFIER_LOG_SIZE = 1 << 24


def prog_load(prog_type: int, name: str, insns: bytes) -> int:
    """Load (verify) a program; returns its fd. A refusal is retried with the
    verifier's log, whose end goes into the error."""
    load = lib().bpf_prog_load
    load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p, ct.c_size_t, ct.c_void_p]
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts))
    fd = load(prog_type, name.encode(), b"GPL", insns, len(insns) // 8, ct.byref(opts))
    if fd >= 0:
        return fd
    err = ct.get_errno() or -fd
    buf = ct.create_string_buffer(VERIFIER_LOG_SIZE)
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts), log_level=1, log_size=len(buf),
                         log_buf=ct.addressof(buf))
    fd = load(prog_type, name.encode(), b"GPL", insns, len(insns) // 8, ct.byref(opts))
    if fd >= 0:  # (it passed the second time: a transient refusal)
        return fd
    tail = buf.value.decode(errors="replace").strip().splitlines()[-12:]
    raise BpfError(err, f"load program {name}: {os.strerror(err)}\n" + "\n".join(tail))


class MappedWords:
    """An mmapped array map of 8-byte values. Each read or write here is
    one aligned 8-byte load or store (ctypes' c_uint64 item access), which a
    program's 8-byte load of the same value sees whole: the way to change
    two 4-byte fields together that a syscall update (a memcpy) does not
    give."""

    def __init__(self, m: Map) -> None:
        info = map_info(m.fd)
        if info.value_size != 8:
            raise ValueError(f"{m.path}: values of {info.value_size} bytes, not 8")
        self.entries = info.max_entries
        size = -(-self.entries * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mm = mmap.mmap(m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._words: Optional[Any] = (ct.c_uint64 * self.entries).from_buffer(self._mm)

    def __getitem__(self, i: int) -> int:
        assert self._words is not None
        return int(self._words[i])

    def __setitem__(self, i: int, value: int) -> None:
        assert self._words is not None
        self._words[i] = value

    def close(self) -> None:
        self._words = None  # (the buffer export ends before the unmap)
        self._mm.close()


class RcuBarrier:
    """``wait()`` returns once every BPF program run that started before the
    call has finished: the kernel answers an update of a map-in-map only
    after synchronize_rcu() (kernel/bpf/syscall.c, maybe_wait_bpf_programs),
    so that user space knows no program still sees the old inner map. About
    8 ms here."""

    def __init__(self) -> None:
        create = lib().bpf_map_create
        create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                           ct.c_void_p]
        self.inner = _check(create(BPF_MAP_TYPE_ARRAY, b"sg_rcu_inner", 4, 4, 1, None),
                            "bpf_map_create (rcu barrier)")
        opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), inner_map_fd=self.inner)
        self.outer = create(BPF_MAP_TYPE_ARRAY_OF_MAPS, b"sg_rcu", 4, 4, 1, ct.byref(opts))
        if self.outer < 0:
            os.close(self.inner)
            _check(self.outer, "bpf_map_create (rcu barrier)")

    def wait(self) -> None:
        key, val = ct.c_uint32(0), ct.c_uint32(self.inner)
        _check(lib().bpf_map_update_elem(self.outer, ct.byref(key), ct.byref(val), BPF_ANY),
               "rcu barrier")

    def close(self) -> None:
        for fd in (self.outer, self.inner):
            if fd >= 0:
                os.close(fd)
        self.outer = self.inner = -1
