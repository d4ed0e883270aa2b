"""The nightly continual-learning update: per-user LoRA training with avalanche-lib, gating, promotion."""
