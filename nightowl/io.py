"""Files that matter, written atomically: a reader (or a process started after a crash) sees the
old file or the new one, never half of one.

One recipe for every such file: write a temp file in the target's folder, flush and fsync it,
rename it over the target, then fsync the folder so the rename itself survives power loss.
Folders (adapters, a base model) go the same way: fill a temp folder, fsync what is in it,
rename it into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole file at `tmp`; it then replaces `path` in one step.

    For writers that want a path (safetensors' `save_file`, ...); see `atomic_write_bytes`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_folder(final: Path, fill: Callable[[Path], None], *, replace: bool = False) -> None:
    """`fill(tmp)` writes a folder's files into `tmp`; then it becomes `final` in one rename.

    `replace=False`: `final` must not exist yet (the rename fails rather than merge two folders).
    `replace=True`: an existing `final` is moved aside first and removed after the swap; a crash
    between the two renames leaves the old folder under a dot-name and no `final`, which readers
    treat as missing (never as half-written).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        old = None
        if replace and final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
