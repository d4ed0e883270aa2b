"""Composition: the process's shared, long-lived parts (settings, database, image store, model,
replay memory), built once per process (server, CLI command, benchmark) and handed down to the
day logger and the night.

Nothing below this layer imports it: the parts it assembles know nothing of each other's
wiring. The model and the replay memory import torch (seconds), so they are imported and built
on first use: CLI commands that never predict or train never pay for them.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING

from nightowl.adapters import registry
from nightowl.memory.db import make_engine, session_scope
from nightowl.memory.images import ImageStore
from nightowl.memory.migrations import init_db
from nightowl.settings import Settings, UpdateConfig

if TYPE_CHECKING:
    from nightowl.adapters.personal import PersonalKit
    from nightowl.adapters.predictor import AdapterRef, Predictor
    from nightowl.memory.replay import ReplayMemory


class Runtime:
    def __init__(self, settings: Settings, predictor: "Predictor | None" = None):
        # `predictor` lets several runtimes (tests, benchmarks) share one loaded model.
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.db_url)
        init_db(self.engine)
        self.images = ImageStore(settings.images_dir, settings.features_dir)
        self._predictor_lock = threading.Lock()
        self._predictor: Predictor | None = predictor

    @property
    def predictor_loaded(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self) -> "Predictor":
        # Loaded on first use (seconds): CLI commands that never predict don't pay for it.
        if self._predictor is None:
            with self._predictor_lock:
                if self._predictor is None:
                    from nightowl.adapters.predictor import (
                        Predictor,  # torch: on first use only
                    )

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
        from nightowl.memory.replay import (
            ReplayMemory,  # faiss + torch: on first use only
        )

        kit = self.personal
        return ReplayMemory(
            self.settings.memory_dir, kit.embed, kit.encoder_id, self.labels, capacity=self.settings.replay_capacity
        )

    @cached_property
    def update_config(self) -> UpdateConfig:
        return self.settings.update

    def active_adapter(self, user_id: str) -> "AdapterRef | None":
        """The adapter that serves this user now (None: the base model)."""
        from nightowl.adapters.predictor import (
            AdapterRef,  # torch; the model is loaded by now anyway
        )

        with session_scope(self.engine) as s:
            row = registry.active(s, user_id)
            if row is None or not registry.built_on(row, self.predictor.encoder_id):
                return None  # no adapter, or one over another base model: the base answers
            return AdapterRef(row.version, self.settings.adapters_dir / row.path)

    def forget_user(self, user_id: str) -> None:
        """Drop a deleted user's cached adapters and replay memory."""
        from nightowl.memory.replay import (
            ReplayMemory,  # faiss + torch: a CLI delete may not have them yet
        )

        if self._predictor is not None:
            self._predictor.adapters.evict_under(registry.user_dir(self.settings.adapters_dir, user_id))

        # No model needed to delete a file: build the path without loading the kit.
        ReplayMemory(self.settings.memory_dir, None, "", self.labels).delete_user(user_id)

    def close(self) -> None:
        self.engine.dispose()
