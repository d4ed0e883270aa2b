"""Composition: the process's shared, long-lived parts (settings, database, image store, model,
replay memory), built once per process (server, CLI command, benchmark) and handed down to the
day logger and the night.

Nothing below this layer imports it: the parts it assembles know nothing of each other's
wiring. The model and the replay memory import torch (seconds), so they are imported and built
on first use: CLI commands that never predict or train never pay for them.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import TYPE_CHECKING

from nightowl.adapters import registry
from nightowl.auth import TokenCache
from nightowl.memory.db import make_engine, read_scope
from nightowl.memory.images import ImageStore
from nightowl.memory.migrations import init_db
from nightowl.settings import Settings, UpdateConfig

if TYPE_CHECKING:
    from nightowl.adapters.personal import PersonalKit
    from nightowl.adapters.predictor import AdapterRef, Predictor
    from nightowl.memory.replay import ReplayMemory

log = logging.getLogger(__name__)

# What nightowl keeps is private: users' texts, images, labels, adapters, the admin token. Every
# folder it creates is 0700 and every file 0600, whoever creates them (our code, SQLite's
# database and its -wal/-shm, safetensors, faiss): the process's umask says so, set once here,
# where every entry point (server, CLI, benchmark) builds its runtime.
PRIVATE_UMASK = 0o077


class Runtime:
    def __init__(self, settings: Settings, predictor: "Predictor | None" = None):
        # `predictor` lets several runtimes (tests, benchmarks) share one loaded model.
        self.settings = settings
        os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)  # keep whatever the caller masked already
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(settings.home)
        self.engine = make_engine(settings.db_url)
        init_db(self.engine)
        self.images = ImageStore(
            settings.images_dir, settings.features_dir, settings.limits.max_concurrent_decodes
        )
        self._predictor_lock = threading.Lock()
        self._predictor: Predictor | None = predictor
        # Users' token lookups that a feedback write checks again (see TokenCache).
        self.token_cache = TokenCache()
        # Parts started on first use (the day's group committer) that must stop before the engine.
        self.closers: list = []

    @property
    def predictor_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self) -> "Predictor":
        # Loaded on first use (seconds): CLI commands that never predict don't pay for it.
        if self._predictor is None:
            with self._predictor_lock:
                if self._predictor is None:
                    # torch: on first use only
                    from nightowl.adapters.predictor import Predictor

                    self._predictor = Predictor(self.settings)
        return self._predictor

    @cached_property
    def labels(self) -> list[str]:
        return list(self.settings.labels)

    # -- the night side's parts, built on first use ------------------------------------------
    @cached_property
    def personal(self) -> PersonalKit:
        """Training/evaluation helpers for per-user adapters over the loaded base model."""
        from nightowl.adapters.personal import PersonalKit  # torch: on first use only

        return PersonalKit(self.predictor, self.images)

    @cached_property
    def replay_memory(self) -> ReplayMemory:
        # faiss + torch: on first use only
        from nightowl.memory.replay import ReplayMemory

        kit = self.personal
        return ReplayMemory(
            self.settings.memory_dir, kit.embed, kit.encoder_id, self.labels, capacity=self.settings.replay_capacity
        )

    @cached_property
    def update_config(self) -> UpdateConfig:
        return self.settings.update

    def active_adapter(self, user_id: str) -> "AdapterRef | None":
        """The adapter that serves this user now (None: the base model)."""
        # torch; the model is loaded by now anyway
        from nightowl.adapters.predictor import AdapterRef

        with read_scope(self.engine) as s:  # serving never waits for a writer
            row = registry.active(s, user_id)
            if row is None or not registry.built_on(row, self.predictor.encoder_id):
                return None  # no adapter, or one over another base model: the base answers
            return AdapterRef(row.version, self.settings.adapters_dir / row.path)

    def forget_user(self, user_id: str) -> None:
        """Drop a deleted user's cached adapters, replay memory and cached rationales."""
        from nightowl.rationales import RationaleCache

        # The user's own folder of the rationale cache: after this it holds none of their text.
        RationaleCache(self.settings.rationale_cache_dir).purge_user(user_id)
        # faiss + torch: a CLI delete may not have them yet
        from nightowl.memory.replay import ReplayMemory

        if self._predictor is not None:
            self._predictor.adapters.evict_under(registry.user_dir(self.settings.adapters_dir, user_id))

        # No model needed to delete a file: build the path without loading the kit.
        ReplayMemory(self.settings.memory_dir, None, "", self.labels).delete_user(user_id)

    def close(self) -> None:
        while self.closers:  # first: a group committer commits what is queued
            self.closers.pop()()
        self.engine.dispose()


def _make_private(home) -> None:
    """A home made by an earlier version (0755): closing the folder itself keeps everyone else out
    of all that is in it."""
    try:
        if home.stat().st_mode & 0o077:
            home.chmod(0o700)
            log.warning("nightowl home %s was readable by others; now 0700", home)
    except OSError as exc:  # not ours to change (a shared mount): say so, and go on
        log.warning("could not make %s private: %s", home, exc)
