"""Per-user adapter versions: files in the standard PEFT layout, their status in the database.

Layout: ``$home/adapters/<sha256(user_id)>/v0001/{adapter_config.json, adapter_model.safetensors}``.
A version's folder is written under a temporary name and renamed into place whole, so a killed
night never leaves a half-written adapter; the status row is what makes it active, and it is
changed in one transaction (old active -> retired, new -> active).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable

from sqlalchemy import func
from sqlmodel import Session, col, select

from nightowl.errors import Conflict, InvalidInput, NotFound
from nightowl.io import atomic_folder
from nightowl.memory.models import AdapterStatus, AdapterVersion, User

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def user_dir(adapters_root: Path, user_id: str) -> Path:
    return adapters_root / hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def version_relpath(user_id: str, version: int) -> str:
    return f"{hashlib.sha256(user_id.encode('utf-8')).hexdigest()}/v{version:04d}"


def lock_user(session: Session, user_id: str) -> User | None:
    """Serialise changes to one user's adapters (promotion vs rollback): a row lock on PostgreSQL;
    SQLite's write transactions are serial already. None if the user no longer exists."""
    return session.exec(select(User).where(User.id == user_id).with_for_update()).first()


def active(session: Session, user_id: str) -> AdapterVersion | None:
    return session.exec(
        select(AdapterVersion).where(AdapterVersion.user_id == user_id, AdapterVersion.status == AdapterStatus.active)
    ).first()


def built_on(row: AdapterVersion, base_model_id: str) -> bool:
    """Whether an adapter was trained over this base model (adapters from before the base was
    recorded are taken as fitting). LoRA deltas over another base would serve nonsense."""
    recorded = (row.metrics or {}).get("base_model")
    return recorded is None or recorded == base_model_id


def versions(session: Session, user_id: str) -> list[AdapterVersion]:
    return list(
        session.exec(select(AdapterVersion).where(AdapterVersion.user_id == user_id).order_by(col(AdapterVersion.version)))
    )


def get(session: Session, user_id: str, version: int) -> AdapterVersion:
    row = session.exec(
        select(AdapterVersion).where(AdapterVersion.user_id == user_id, AdapterVersion.version == version)
    ).first()
    if row is None:
        raise NotFound(f"user {user_id!r} has no adapter version {version}")
    return row


def write_version_files(adapters_root: Path, user_id: str, version: int, save: Callable[[Path], None]) -> str:
    """Have `save(folder)` write the PEFT files into a temp folder, then rename it into place."""
    rel = version_relpath(user_id, version)

    def fill(tmp: Path) -> None:
        save(tmp)
        missing = [f for f in PEFT_FILES if not (tmp / f).exists()]
        if missing:
            raise RuntimeError(f"adapter save wrote no {missing}")

    # replace=True: a folder already at this version was left by a run killed after the rename
    # but before its row was written (versions are numbered from the rows), so it is debris.
    atomic_folder(adapters_root / rel, fill, replace=True)
    return rel


def next_version(session: Session, user_id: str) -> int:
    current = session.exec(select(func.max(AdapterVersion.version)).where(AdapterVersion.user_id == user_id)).one()
    return (current or 0) + 1


def activate(session: Session, user_id: str, version: int, reason: str | None = None) -> AdapterVersion:
    """Make `version` the user's active adapter (promotion or rollback); the old one is retired."""
    target = get(session, user_id, version)
    if target.status == AdapterStatus.active:
        return target
    current = active(session, user_id)
    if current is not None:
        current.status = AdapterStatus.retired
        session.add(current)
        session.flush()  # one active row per user at every moment
    target.status = AdapterStatus.active
    if reason:
        target.reason = reason
    session.add(target)
    return target


def rollback(session: Session, user_id: str, version: int | None, adapters_root: Path,
             reason: str = "rolled back to the base model") -> AdapterVersion | None:
    """Go back to an earlier version (or to the base model with version=None; `reason` says why)."""
    lock_user(session, user_id)
    if version is None:
        current = active(session, user_id)
        if current is not None:
            current.status = AdapterStatus.retired
            current.reason = reason
            session.add(current)
        return None
    target = get(session, user_id, version)
    if not all((adapters_root / target.path / f).exists() for f in PEFT_FILES):
        raise Conflict(f"adapter version {version} has no files on disk; it can't be activated")
    if target.status == AdapterStatus.candidate:
        raise InvalidInput(f"version {version} is a candidate still being evaluated")
    return activate(session, user_id, version, reason=f"rolled back to v{version}")


def export(session: Session, user_id: str, version: int | None, adapters_root: Path, dest: Path) -> AdapterVersion:
    row = get(session, user_id, version) if version is not None else active(session, user_id)
    if row is None:
        raise NotFound(f"user {user_id!r} has no active adapter")
    dest.mkdir(parents=True, exist_ok=True)
    for f in PEFT_FILES:
        shutil.copyfile(adapters_root / row.path / f, dest / f)
    return row


def delete_user_files(adapters_root: Path, user_id: str) -> None:
    shutil.rmtree(user_dir(adapters_root, user_id), ignore_errors=True)
