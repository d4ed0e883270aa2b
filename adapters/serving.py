"""User-specific inference: the shared base loaded once, user LoRA adapters on top, LRU-cached.

Every user adapter has the same LoRA shape (the base model's `lora_*` config), so the base
carries ONE adapter slot, injected once. Serving a user copies their LoRA tensors into that
slot (a few hundred KB, well under a millisecond); the LRU keeps the tensors of the most recent
`capacity` adapters in memory so a hit never touches the disk. A user without an adapter is
served with the slot disabled, i.e. by the plain base.

(peft's own multi-adapter route — `load_adapter` per user — re-injects LoRA layers into every
target module on each load: measured at ~0.7 s per load here, and it slows every forward as
adapters accumulate.)

Switching mutates shared state, so a lock spans switch + forward: on a CPU one forward already
uses every core, so serialising loses nothing.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

SLOT = "serving"
SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "modules_to_save")
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterUnavailable(RuntimeError):
    """An adapter's files are missing, unreadable or of another shape."""


class AdapterCache:
    def __init__(self, base: torch.nn.Module, lora_config: LoraConfig, capacity: int = 64):
        if capacity < 1:
            raise ValueError("adapter cache capacity must be at least 1")
        self.capacity = capacity
        self.lora_config = lora_config
        self.peft: PeftModel = get_peft_model(base, lora_config, adapter_name=SLOT).eval()
        self._weights: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._in_slot: str | None = None
        self._lock = threading.RLock()
        self.loads = 0  # adapter reads from disk (benchmarks and tests count them)

    def _shape(self, cfg: dict) -> tuple:
        def norm(v):
            return sorted(v) if isinstance(v, (list, set, tuple)) else v

        return tuple(norm(cfg.get(k)) for k in SHAPE_KEYS)

    def _read(self, folder: Path) -> dict[str, torch.Tensor]:
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            mine = self._shape({k: getattr(self.lora_config, k) for k in SHAPE_KEYS})
            if self._shape(cfg) != mine:
                raise ValueError(f"LoRA shape {self._shape(cfg)} unlike the serving slot's {mine}")
            device = next(self.peft.parameters()).device
            weights = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        except Exception as exc:
            raise AdapterUnavailable(f"adapter {folder}: {type(exc).__name__}: {exc}") from exc
        self.loads += 1
        return weights

    @staticmethod
    def _key(folder: Path) -> str:
        """The folder and its weights file's identity: a folder path can come back with other
        weights (a user deleted by another process and created again), a stat is microseconds."""
        try:
            st = (folder / WEIGHTS_FILE).stat()
        except OSError as exc:
            raise AdapterUnavailable(f"adapter {folder}: {exc}") from exc
        return f"{folder}@{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"

    def _weights_for(self, folder: Path) -> tuple[str, dict[str, torch.Tensor]]:
        """The folder's cache key and LoRA tensors (one stat per request: the key names both)."""
        key = self._key(folder)
        if key in self._weights:
            self._weights.move_to_end(key)
            return key, self._weights[key]
        weights = self._read(folder)
        self._weights[key] = weights
        while len(self._weights) > self.capacity:
            old, _ = self._weights.popitem(last=False)
            if old == self._in_slot:
                self._in_slot = None
        return key, weights

    @contextmanager
    def model_for(self, adapter_folder: Path | None) -> Iterator[torch.nn.Module]:
        """The model to run for one request: the user's adapter in the slot, or the plain base."""
        with self._lock:
            if adapter_folder is None:
                with self.peft.disable_adapter():
                    yield self.peft
                return
            key, weights = self._weights_for(adapter_folder)
            if self._in_slot != key:
                # A failed copy may have written part of the slot: mark it empty before trying.
                self._in_slot = None
                try:
                    result = set_peft_model_state_dict(self.peft, weights, adapter_name=SLOT)
                except Exception as exc:  # wrong tensor shapes, dtype, ...: the slot is unusable
                    self._weights.pop(key, None)
                    raise AdapterUnavailable(f"adapter {adapter_folder}: {type(exc).__name__}: {exc}") from exc
                unexpected = getattr(result, "unexpected_keys", [])
                if unexpected:
                    self._weights.pop(key, None)
                    raise AdapterUnavailable(f"adapter {adapter_folder} has weights the slot doesn't: {unexpected[:3]}")
                self._in_slot = key
            yield self.peft

    def evict_under(self, folder: Path) -> None:
        """Drop every cached adapter under `folder` (a deleted user's versions)."""
        prefix = str(folder).rstrip("/") + "/"
        with self._lock:
            for key in [k for k in self._weights if k.startswith(prefix)]:
                del self._weights[key]
                if key == self._in_slot:
                    self._in_slot = None

    def __len__(self) -> int:
        return len(self._weights)
