"""nightowl's model: the rationale-fused classifier, its LoRA adapters and how they are served."""
