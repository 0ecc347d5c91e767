"""Atomic writes: the old file survives a failed write and no temporary is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from facesearch.model.fileio import atomic_write_bytes, atomic_write_text, atomic_write_with


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\r\n")
    assert target.read_bytes() == b"two\r\n", "text is written byte for byte (no newline translation)"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_write_with_a_library_writer(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    atomic_write_with(target, lambda tmp: tmp.write_bytes(b"first"), per_process=True)
    assert target.read_bytes() == b"first"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, broken)
    assert target.read_bytes() == b"first", "a writer that fails leaves the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"], "and no temporary behind"
