"""Compile once, load into any pin directory.

bcc compiles the C in-process with clang (about 6 s here) and then loads what
it compiled against the maps its source names by pin path. Nothing in the
compiled instructions depends on where the maps are pinned, only on which map
each reference means. So a build is compiled once per (source, flags, kernel,
bcc) in a scratch pin directory, and what the loader needs is kept in a cache
directory: each program's instructions, the maps they reference, and at which
instructions. Loading a build creates or opens the maps in the wanted pin
directory, writes their fds into those instructions and has the kernel verify
the programs (about 1 s). The first start after boot, ``sgctl reset`` and
every test daemon then pay the verifier, not clang.

A cached build is code the kernel will run: the cache directory must be
root's and closed to others (else it is not used), a file that does not
parse as a build is compiled again, and a program whose map references are
not exactly the recorded ones is refused before it reaches the kernel.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from controller.kernel import bpfsys

log = logging.getLogger("sgctl")

FORMAT = 1  # of the cached file; part of the key
DEFAULT_CACHE_DIR = "/var/cache/sgctl"
KEEP = 8  # builds kept in the cache, the most recently used
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
PROGRAMS = {"xdp_sg": BPF_PROG_TYPE_XDP, "tc_sg": BPF_PROG_TYPE_SCHED_CLS}
INSN = 8  # bytes of one BPF instruction
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instructions, the first holds a map fd
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2  # its src_reg when the imm is a map reference


class BuildError(RuntimeError):
    """The programs could not be compiled or loaded."""


@dataclass(frozen=True)
class MapSpec:
    name: str  # the pin's file name (pinned) or the kernel's map name
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pinned: bool  # shared through SG_PIN_DIR/name; else private to one load

    @staticmethod
    def of(name: str, info: bpfsys.MapInfo, pinned: bool) -> MapSpec:
        return MapSpec(name, info.type, info.key_size, info.value_size, info.max_entries,
                       info.flags, pinned)


@dataclass(frozen=True)
class ProgSpec:
    name: str
    type: int
    insns: bytes
    relocs: Tuple[Tuple[int, str], ...]  # (instruction index, map name) of every map reference


@dataclass(frozen=True)
class Build:
    key: str
    maps: Dict[str, MapSpec]
    progs: Dict[str, ProgSpec]

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "key": self.key,
            "maps": [asdict(m) for m in self.maps.values()],
            "progs": [{"name": p.name, "type": p.type,
                       "insns": base64.b64encode(p.insns).decode(),
                       "relocs": [list(r) for r in p.relocs]} for p in self.progs.values()]})

    @staticmethod
    def from_json(text: str, key: str) -> Build:
        """Raises ValueError on anything but a well-formed build of ``key``."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("key") != key:
                raise ValueError("not a build of this source (format or key)")
            maps = {m["name"]: MapSpec(**m) for m in d["maps"]}
            progs = {}
            for p in d["progs"]:
                insns = base64.b64decode(p["insns"], validate=True)
                relocs = tuple((int(i), str(n)) for i, n in p["relocs"])
                progs[p["name"]] = ProgSpec(p["name"], int(p["type"]), insns, relocs)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed: {type(exc).__name__} {exc}") from None
        build = Build(key, maps, progs)
        build.check()
        return build

    def check(self) -> None:
        """Every map reference of every program is a recorded one, to a known map."""
        for m in self.maps.values():
            fields = (m.type, m.key_size, m.value_size, m.max_entries, m.flags)
            if not all(type(v) is int and 0 <= v < 1 << 32 for v in fields) or not m.name:
                raise ValueError(f"map {m.name!r}: {fields}")
        if set(self.progs) != set(PROGRAMS):
            raise ValueError(f"programs {sorted(self.progs)}")
        for p in self.progs.values():
            if p.type != PROGRAMS[p.name] or len(p.insns) % INSN:
                raise ValueError(f"program {p.name}: type or length")
            refs = dict(p.relocs)
            if refs.keys() != set(map_references(p.insns)) or not set(refs.values()) <= set(self.maps):
                raise ValueError(f"program {p.name}: map references do not match")


_BUILDER = Path(__file__).read_bytes()  # this file: how a build is made and kept


def build_key(source: str, cflags: List[str]) -> str:
    """What a build depends on: the source, the flags, the kernel whose
    headers it was compiled against, the compiler, and this builder."""
    h = hashlib.sha256(_BUILDER)
    for part in (str(FORMAT), source, "\0".join(cflags), platform.release(), _bcc_version()):
        h.update(part.encode() + b"\0\0")
    return h.hexdigest()


def _bcc_version() -> str:
    try:
        import bcc  # the compiler's version only; imported here so that a load needs no bcc

        return str(getattr(bcc, "__version__", "?"))
    except ImportError:
        return "none"


def map_references(insns: bytes) -> List[int]:
    """Indexes of the instructions that load a map reference."""
    out = []
    i, n = 0, len(insns) // INSN
    while i < n:
        if insns[i * INSN] == LD_IMM64:
            if insns[i * INSN + 1] >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                out.append(i)
            i += 2  # the second half of the 16-byte instruction
        else:
            i += 1
    return out


def compile_build(source: str, cflags: List[str]) -> Tuple[Build, Any]:
    """Compile with bcc in a scratch pin directory; returns the build and
    bcc's module (whose tables tests compare with the ctypes mirrors)."""
    from bcc import BPF  # imported late: only a compile needs it

    scratch = f"/sys/fs/bpf/sgctl-build-{uuid.uuid4().hex[:12]}"
    os.makedirs(scratch)
    try:
        try:
            b = BPF(text=source.encode(), cflags=[f'-DSG_PIN_DIR="{scratch}"', *cflags])
        except Exception as exc:  # bcc raises plain Exception on compile errors
            raise BuildError(f"compiling the BPF programs failed: {exc}") from exc
        pinned: Dict[int, str] = {}
        maps: Dict[str, MapSpec] = {}  # every pinned map, used by the code or not
        for name in os.listdir(scratch):
            fd = bpfsys.obj_get(os.path.join(scratch, name))
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            pinned[info.id] = name
            maps[name] = MapSpec.of(name, info, True)
        progs: Dict[str, ProgSpec] = {}
        for prog, ptype in PROGRAMS.items():
            insns = bytes(b.dump_func(prog.encode()))
            relocs = []
            for i in map_references(insns):
                if insns[i * INSN + 1] >> 4 != PSEUDO_MAP_FD:
                    raise BuildError(f"{prog}: instruction {i} references a map value "
                                     "(global data is not supported)")
                fd = int.from_bytes(insns[i * INSN + 4:i * INSN + 8], "little", signed=True)
                info = bpfsys.map_info(fd)
                name = pinned.get(info.id, info.name)
                spec = MapSpec.of(name, info, info.id in pinned)
                if maps.setdefault(name, spec) != spec:
                    raise BuildError(f"two maps are called {name}")
                relocs.append((i, name))
            progs[prog] = ProgSpec(prog, ptype, insns, tuple(relocs))
        build = Build(build_key(source, cflags), maps, progs)
        build.check()
        return build, b
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _private_dir(path: str) -> bool:
    """Create ``path`` (0700) if needed; True if it is root's (or this
    user's) and nobody else may write it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        log.warning("build cache %s unusable (%s): compiling without it", path, exc)
        return False
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("build cache %s is not private (owner %d, mode %o): compiling without it",
                    path, st.st_uid, stat.S_IMODE(st.st_mode))
        return False
    return True


def cached_build(source: str, cflags: List[str], cache_dir: Optional[str]) -> Build:
    """The build of this source and flags: from the cache, else compiled
    (one process at a time per cache; the others then read its result). A
    cache that cannot be used or written costs a compile, never the load."""
    key = build_key(source, cflags)
    if cache_dir is None or not _private_dir(cache_dir):
        return compile_build(source, cflags)[0]
    path = os.path.join(cache_dir, f"{key[:32]}.json")
    try:
        lock = open(os.path.join(cache_dir, ".lock"), "a")
    except OSError as exc:
        log.warning("build cache %s unusable (%s): compiling without it", cache_dir, exc)
        return compile_build(source, cflags)[0]
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        got = _read(path, key)
        if got is not None:
            os.utime(path)  # recently used: kept by the pruning
            return got
        build = compile_build(source, cflags)[0]
        try:
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".build-")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(build.to_json())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _prune(cache_dir)
        except OSError as exc:  # e.g. a full disk: the next start compiles again
            log.warning("could not keep the build in %s (%s)", cache_dir, exc)
        return build


def _read(path: str, key: str) -> Optional[Build]:
    try:
        with open(path) as f:
            return Build.from_json(f.read(), key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cached build %s is unusable (%s): compiling again", path, exc)
        return None


def _prune(cache_dir: str) -> None:
    files = sorted((e for e in os.scandir(cache_dir) if e.name.endswith(".json")),
                   key=lambda e: e.stat().st_mtime, reverse=True)
    for e in files[KEEP:]:
        os.unlink(e.path)


def load(build: Build, pin_dir: str) -> Dict[str, int]:
    """Open the build's pinned maps in ``pin_dir`` (creating and pinning
    those that are missing) and private ones, put their fds into the
    programs and load them. Returns program name -> fd."""
    fds: Dict[str, int] = {}
    progs: Dict[str, int] = {}
    try:
        for spec in build.maps.values():
            path = os.path.join(pin_dir, spec.name)
            if spec.pinned and os.path.exists(path):
                fds[spec.name] = fd = bpfsys.obj_get(path)
                have = bpfsys.map_info(fd)
                if (have.type, have.key_size, have.value_size) != (
                        spec.type, spec.key_size, spec.value_size):
                    raise BuildError(f"pinned map {path} is of another kind than this build's "
                                     f"({have} vs {spec})")
                continue
            fds[spec.name] = fd = bpfsys.map_create(spec.type, spec.name[:15], spec.key_size,
                                                    spec.value_size, spec.max_entries,
                                                    spec.flags)
            if spec.pinned:
                bpfsys.obj_pin(fd, path)
        for p in build.progs.values():
            insns = bytearray(p.insns)
            for i, name in p.relocs:
                insns[i * INSN + 4:i * INSN + 8] = fds[name].to_bytes(4, "little", signed=True)
            progs[p.name] = bpfsys.prog_load(p.type, p.name, bytes(insns))
        return progs
    except bpfsys.BpfError as exc:
        for fd in progs.values():
            os.close(fd)
        raise BuildError(f"loading the BPF programs failed: {exc}") from exc
    finally:
        for fd in fds.values():
            os.close(fd)
