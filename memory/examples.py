"""The labelled example: what the store's queries give the night, what the replay memory keeps
and what the trainer learns from (plain data, cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A labelled example as the memory (and the trainer) sees it."""

    id: int  # feedback id (> 0) for a user's example; 0 for an answer the user let stand; -(position + 1) for a global one
    text: str
    aspect: str | None
    label: str
    image_sha256: str | None = None
    context: str | None = None
    rationale: str | None = None  # the post's stored rationale (training signal), if any
    post_id: int | None = None  # the user's post it labels (None: a global example)
