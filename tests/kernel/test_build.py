"""The build cache (controller/kernel/build.py): what it refuses to load.
That a cached build equals a compile is in test_abi.py."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from controller.kernel import bpfsys, build
from controller.kernel.dataplane import program_source

pytestmark = pytest.mark.kernel


@pytest.fixture
def session_build(kernel) -> build.Build:
    return build.cached_build(program_source(), kernel.dp.cflags(), kernel.dp.cache_dir)


def test_a_build_whose_map_references_differ_is_refused(session_build: build.Build) -> None:
    prog = session_build.progs["xdp_sg"]
    assert len(prog.relocs) > 10
    dropped = dataclasses.replace(prog, relocs=prog.relocs[1:])  # one reference unrecorded
    with pytest.raises(ValueError, match="map references"):
        dataclasses.replace(session_build, progs={**session_build.progs, "xdp_sg": dropped}).check()
    unknown = dataclasses.replace(prog, relocs=((prog.relocs[0][0], "sg_nothing"),
                                                *prog.relocs[1:]))
    with pytest.raises(ValueError, match="map references"):
        dataclasses.replace(session_build, progs={**session_build.progs, "xdp_sg": unknown}).check()


def test_a_damaged_or_foreign_cache_file_is_not_loaded(session_build: build.Build,
                                                       tmp_path: Path, caplog) -> None:
    key = session_build.key
    path = tmp_path / "b.json"
    good = session_build.to_json()
    path.write_text(good)
    assert build._read(str(path), key) == session_build
    assert build._read(str(path), "0" * 64) is None  # another source's build
    for bad in (good[:len(good) // 2], "[]", good.replace('"relocs": [[', '"relocs": [[1', 1)):
        path.write_text(bad)
        with caplog.at_level(logging.WARNING, logger="sgctl"):
            assert build._read(str(path), key) is None
    assert "compiling again" in caplog.text


def test_a_cache_directory_others_may_write_is_not_used(tmp_path: Path, caplog) -> None:
    d = tmp_path / "cache"
    assert build._private_dir(str(d)) and (os.stat(d).st_mode & 0o777) == 0o700
    os.chmod(d, 0o777)
    with caplog.at_level(logging.WARNING, logger="sgctl"):
        assert not build._private_dir(str(d))
    assert "not private" in caplog.text


def test_a_cache_that_cannot_be_written_costs_a_compile_not_the_load(
        session_build: build.Build, tmp_path: Path, monkeypatch, caplog) -> None:
    compiled = []
    monkeypatch.setattr(build, "compile_build",
                        lambda source, cflags: (compiled.append(1) or session_build, None))
    source, cflags = "int x;", ["-DX"]
    locked = tmp_path / "locked"
    (locked / ".lock").mkdir(parents=True, mode=0o700)
    os.chmod(locked, 0o700)
    full = tmp_path / "full"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="sgctl"):
        assert build.cached_build(source, cflags, str(locked)) is session_build
        monkeypatch.setattr(build.tempfile, "mkstemp", no_space)
        assert build.cached_build(source, cflags, str(full)) is session_build
    assert len(compiled) == 2 and not list(full.glob("*.json"))
    assert "compiling without it" in caplog.text and "could not keep the build" in caplog.text


def test_the_programs_leave_the_verifier_room(kernel) -> None:
    """The verifier walks every path of a program within a budget of 1M
    instructions; past it the program does not load at all. Reading the
    endpoint through two kinds of map pointer once doubled the walk (to 91%
    of the budget), and one more small change then failed to load. Each
    program stays under 70% of it."""
    for name, fd in (("xdp_sg", kernel.progs.xdp_fd), ("tc_sg", kernel.progs.tc_fd)):
        walked = bpfsys.prog_verified_insns(fd)
        assert 0 < walked <= 0.7 * bpfsys.VERIFIER_INSN_BUDGET, (
            f"{name}: the verifier walked {walked} instructions of its "
            f"{bpfsys.VERIFIER_INSN_BUDGET}")
