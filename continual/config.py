"""The nightly update's settings (what `[update]` in nightowl.toml may override).

Kept apart from the update itself so that loading settings never imports torch or avalanche.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

REPLAY_KINDS = ("faiss", "random", "none")
GATE_METRICS = ("macro_f1", "accuracy")


@dataclass
class UpdateConfig:
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    holdout_fraction: float = 0.2
    min_new_for_holdout: int = 5
    neighbours_per_new: int = 2
    random_ratio: float = 0.5
    n_global: int = 16
    ewc_lambda: float = 0.0  # > 0: EWC anchored at the user's starting model (continual.regularizers)
    lwf_alpha: float = 0.0  # > 0: LwF distilling from the user's starting model
    replay: str = "faiss"  # "faiss" | "random" | "none" (the last two are for the benchmark's ablations)
    # The user's label prior vs the base model's, added to the logits (see PersonalKit.prior_adjustment);
    # strength = pseudo-counts of the base prior. <= 0 turns the correction off.
    prior_strength: float = 5.0
    gate_metric: str = "macro_f1"  # "macro_f1" | "accuracy": what "not worse" means at the gate

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                problems.append(f"{f.name} must be an integer, not {value!r}")
            elif f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{f.name} must be a number, not {value!r}")
        if not problems:
            if min(self.epochs, self.batch_size) < 1:
                problems.append("epochs and batch_size must be at least 1")
            if min(self.min_new_for_holdout, self.neighbours_per_new, self.n_global) < 0:
                problems.append("min_new_for_holdout, neighbours_per_new and n_global must not be negative")
            if not 0 <= self.holdout_fraction < 1 or self.random_ratio < 0:
                problems.append("holdout_fraction must be in [0, 1) and random_ratio >= 0")
            if min(self.lr, self.ewc_lambda, self.lwf_alpha) < 0:
                problems.append("lr, ewc_lambda and lwf_alpha must not be negative")
        if self.replay not in REPLAY_KINDS:
            problems.append(f"replay must be one of {list(REPLAY_KINDS)}")
        if self.gate_metric not in GATE_METRICS:
            problems.append(f"gate_metric must be one of {list(GATE_METRICS)}")
        if problems:
            raise ValueError("nightly update settings: " + "; ".join(problems))

    @classmethod
    def from_overrides(cls, overrides: dict) -> "UpdateConfig":
        """Defaults, with settings.update's values on top (a typo is an error, not a no-op)."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown nightly update settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**overrides)
