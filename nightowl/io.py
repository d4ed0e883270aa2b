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


def _keep_mode(tmp: Path, path: Path) -> None:
    """Give the new file the mode of the one it replaces (mkstemp makes 0600 files, so without this
    rewriting a 0644 file would silently make it private); a new file keeps mkstemp's 0600."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


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
        _keep_mode(tmp, path)
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


def write_once(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; never replaces it. True when this call made it.

    For files that must stay as first written (a generated secret, an admin token): concurrent
    creators all end up reading the first one's bytes, and no reader sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(name, path)  # atomic, and fails rather than replace
        except FileExistsError:
            return False
    finally:
        Path(name).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def atomic_folder(final: Path, fill: Callable[[Path], None], *, replace: bool = False) -> None:
    """`fill(tmp)` writes a folder's files into `tmp`; then it becomes `final` in one rename.

    `replace=False`: `final` must not exist yet (FileExistsError rather than merge or swap two
    folders; a concurrent writer that wins the race makes the rename fail the same way).
    `replace=True`: an existing `final` is moved aside first and removed after the swap; a crash
    between the two renames leaves the old folder under a dot-name and no `final`, which readers
    treat as missing (never as half-written). If the second rename itself fails, the old folder
    is put back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        fill(tmp)
        # Files first, then every folder bottom-up, so each entry is durable before its parent's.
        for f in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if f.is_file():
                _fsync_file(f)
            elif f.is_dir():
                fsync_dir(f)
        fsync_dir(tmp)
        old = None
        if final.exists():
            if not replace:
                # os.rename would silently replace an *empty* folder on POSIX: say no explicitly.
                raise FileExistsError(f"{final} exists already")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None and not final.exists():
                os.replace(old, final)  # the swap failed: the old folder stays in place
            raise
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
