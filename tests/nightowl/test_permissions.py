"""Issue 12, case 8: what nightowl keeps is private. The home and every folder made under it are
0700, every file 0600: the database and its -wal/-shm, images, features, adapters, replay
memory, the admin token."""

from __future__ import annotations

import os
import stat

import pytest

from nightowl.auth import load_or_create_admin_token
from nightowl.continual.night import run_night
from nightowl.day import logger
from nightowl.memory.models import RunStatus
from nightowl.runtime import Runtime
from nightowl.settings import UpdateConfig
from tests.conftest import FIXTURES, make_settings

TEXTS = [
    "Great, another Monday. Just what I needed",
    "I just love being stuck in traffic for two hours",
    "Oh great, the printer is jammed again",
    "Fantastic, my flight got delayed again",
]


@pytest.fixture
def open_umask():
    """The usual 022, as a shell would hand it to the server: nightowl must close it itself."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _open_to_others(home) -> list[str]:
    found = []
    for root, dirs, files in os.walk(home):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            mode = os.lstat(name).st_mode
            if stat.S_IMODE(mode) & 0o077:
                found.append(f"{oct(stat.S_IMODE(mode))} {os.path.relpath(name, home)}")
    return sorted(set(found))


def test_nothing_under_the_home_is_open_to_others(tmp_path, predictor, open_umask):
    home = tmp_path / "home"
    rt = Runtime(make_settings(home), predictor=predictor)
    rt.update_config = UpdateConfig(epochs=1, n_global=0, min_examples_for_holdout=100)
    load_or_create_admin_token(None, home)
    logger.create_user(rt, "pat")
    image = (FIXTURES / "images" / "74960.jpg").read_bytes()
    posted = logger.log_post(rt, "pat", "Great, the $T$ is here", aspect="weekend", image=image)
    for i, text in enumerate(TEXTS):
        post = posted if i == 0 else logger.log_post(rt, "pat", text)
        logger.log_feedback(rt, "pat", post.post_id, "negative", "sarcasm", f"k{i}")
    assert [r.status for r in run_night(rt).results] in ([RunStatus.promoted], [RunStatus.rejected])

    names = {p.name for p in home.rglob("*")}
    assert {"nightowl.db", "admin_token", "images", "features", "adapters"} <= names
    assert any(n.endswith("-wal") for n in names)  # SQLite's own files are checked too
    assert _open_to_others(home) == []
    rt.close()


def test_an_existing_open_home_is_closed(tmp_path, open_umask):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    Runtime(make_settings(home)).close()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert _open_to_others(home) == []
