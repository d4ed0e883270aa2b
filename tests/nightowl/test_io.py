"""The one atomic-write helper: a failed write leaves the old file (or folder) and no debris."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nightowl.io import (
    atomic_folder,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


class Boom(Exception):
    pass


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _entries(target.parent) == {"f.json"}


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ne")  # half of the new file, then the writer dies
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _entries(tmp_path) == {"f.bin"}


def test_failed_first_write_leaves_nothing(tmp_path):
    def fail(tmp: Path) -> None:
        raise Boom

    with pytest.raises(Boom):
        atomic_write(tmp_path / "new.bin", fail)
    assert _entries(tmp_path) == set()


def test_rewrite_keeps_the_file_mode(tmp_path):
    target = tmp_path / "README.md"
    target.write_text("old")
    os.chmod(target, 0o644)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o644


def _fill(content: str):
    def fill(tmp: Path) -> None:
        (tmp / "a.txt").write_text(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(content)

    return fill


def test_folder_written_whole(tmp_path):
    final = tmp_path / "v0001"
    atomic_folder(final, _fill("x"))
    assert (final / "a.txt").read_text() == "x" and (final / "sub" / "b.txt").read_text() == "x"
    assert _entries(tmp_path) == {"v0001"}


@pytest.mark.parametrize("empty", [False, True])
def test_folder_refuses_existing_target_unless_replace(tmp_path, empty):
    final = tmp_path / "model"
    if empty:
        final.mkdir()  # os.rename alone would silently replace an empty folder
    else:
        atomic_folder(final, _fill("old"))
    with pytest.raises(FileExistsError):
        atomic_folder(final, _fill("new"))
    assert _entries(tmp_path) == {"model"}  # no temp folder left
    if not empty:
        assert (final / "a.txt").read_text() == "old"

    atomic_folder(final, _fill("new"), replace=True)
    assert (final / "a.txt").read_text() == "new"
    assert _entries(tmp_path) == {"model"}  # the old folder is gone too


def test_failed_fill_keeps_old_folder_and_leaves_no_temp(tmp_path):
    final = tmp_path / "model"
    atomic_folder(final, _fill("old"))

    def half_then_fail(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_folder(final, half_then_fail, replace=True)
    assert (final / "a.txt").read_text() == "old"
    assert _entries(tmp_path) == {"model"}


def test_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    atomic_folder(final, _fill("old"))
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(dst) == final:
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk gone"):
        atomic_folder(final, _fill("new"), replace=True)
    assert (final / "a.txt").read_text() == "old"
    assert _entries(tmp_path) == {"model"}


def test_write_once_keeps_the_first_file_and_leaves_no_temp(tmp_path):
    from nightowl.io import write_once

    path = tmp_path / "secret"
    assert write_once(path, b"first")
    assert not write_once(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
    assert path.stat().st_mode & 0o077 == 0
