"""FAISS replay memory: persistence, sync with the store, eviction, replay selection."""

from __future__ import annotations

import numpy as np
import pytest

from nightowl.day import logger
from nightowl.memory.examples import Example
from nightowl.memory.night_queries import user_examples
from nightowl.memory.replay import ReplayMemory
from nightowl.memory.vector_index import VectorIndex

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def embed(predictor, tmp_path_factory):
    """Vectors from the frozen base model, as the nightly update uses them."""
    from nightowl.adapters.personal import PersonalKit
    from nightowl.memory.images import ImageStore

    root = tmp_path_factory.mktemp("images")
    kit = PersonalKit(predictor, ImageStore(root / "i", root / "f"))
    calls = {"n": 0}

    def fn(examples):
        calls["n"] += len(examples)
        return kit.embed(examples)

    fn.calls = calls
    return fn


def _ex(i, text, label="positive"):
    return Example(id=i, text=text, aspect=None, label=label)


def test_vector_index_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    idx = VectorIndex(16, {"encoder_id": "e"})
    idx.add(np.array([5, 9, 11]), rng.standard_normal((3, 16)).astype(np.float32), np.array([0, 1, 2]))
    idx.remove([9])
    path = tmp_path / "m.safetensors"
    idx.save(path)
    back = VectorIndex.load(path)
    assert sorted(back.ids.tolist()) == [5, 11] and back.labels == {5: 0, 11: 2}
    assert back.meta["encoder_id"] == "e"
    sims, ids = back.search(idx.vectors([11]), 1)
    assert ids[0, 0] == 11 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_sync_adds_missing_and_drops_superseded(tmp_path, embed, predictor):
    mem = ReplayMemory(tmp_path / "mem", embed, predictor.encoder_id, LABELS)
    exs = [_ex(1, "I love this phone"), _ex(2, "worst service ever", "negative"), _ex(3, "it is a table", "neutral")]
    idx = mem.sync_user("alice", exs)
    assert sorted(idx.ids.tolist()) == [1, 2, 3]
    before = embed.calls["n"]
    # Feedback 2 superseded by 4 (a later correction on the same post): 2 leaves, only 4 is embedded.
    idx = mem.sync_user("alice", [exs[0], exs[2], _ex(4, "worst service ever", "neutral")])
    assert sorted(idx.ids.tolist()) == [1, 3, 4]
    assert embed.calls["n"] - before == 1
    # The file is named by a digest, never by the user id.
    assert mem.user_path("alice").exists() and "alice" not in str(mem.user_path("alice"))
    # A memory built by another base model is stale: rebuilt.
    other = ReplayMemory(tmp_path / "mem", embed, "another-encoder", LABELS)
    assert other.load_user("alice") is None


def test_eviction_drops_near_duplicates_first(tmp_path, embed, predictor):
    mem = ReplayMemory(tmp_path / "mem", embed, predictor.encoder_id, LABELS, capacity=4)
    exs = [
        _ex(1, "great game tonight, so happy"),
        _ex(2, "great game tonight, so happy!!"),
        _ex(3, "great game tonight , so happy"),
        _ex(4, "the tax office lost my forms again", "negative"),
        _ex(5, "weather report: cloudy", "neutral"),
        _ex(6, "my cat knocked over the plant", "neutral"),
    ]
    idx = mem.sync_user("bob", exs)
    kept = sorted(idx.ids.tolist())
    assert len(kept) == 4
    assert {4, 5, 6} <= set(kept)  # the distinct lessons survive; the duplicates go first
    # Evicted rows stay evicted on the next sync (not re-embedded and re-evicted every night).
    before = embed.calls["n"]
    mem.sync_user("bob", exs)
    assert embed.calls["n"] == before


def test_replay_selection_prefers_neighbours_of_new_examples(tmp_path, embed, predictor):
    mem = ReplayMemory(tmp_path / "mem", embed, predictor.encoder_id, LABELS)
    older = [
        _ex(1, "the new iPhone battery is awful", "negative"),
        _ex(2, "football match was thrilling"),
        _ex(3, "recipe for banana bread", "neutral"),
        _ex(4, "election results announced today", "neutral"),
        _ex(5, "my flight got cancelled again", "negative"),
    ]
    new = [_ex(10, "iPhone battery drains so fast", "negative")]
    idx = mem.sync_user("cy", older + new)
    mem.build_global([_ex(0, "global example one", "neutral"), _ex(0, "global example two")])
    sel = mem.select_replay(idx, [10], neighbours_per_new=1, random_ratio=1.0, n_global=1, rng=np.random.default_rng(0))
    assert sel.neighbour_ids == [1]
    assert len(sel.random_ids) == 1 and sel.random_ids[0] in {2, 3, 4, 5}
    assert len(sel.global_examples) == 1 and sel.global_examples[0].text.startswith("global")
    mem.delete_user("cy")
    assert not mem.user_path("cy").exists()


def test_user_examples_from_store(sqlite_runtime):
    rt = sqlite_runtime
    logger.create_user(rt, "dora")
    p1 = logger.log_post(rt, "dora", "first").post_id
    p2 = logger.log_post(rt, "dora", "second").post_id
    f1 = logger.log_feedback(rt, "dora", p1, "positive").feedback_id
    logger.log_feedback(rt, "dora", p2, "negative")
    f3 = logger.log_feedback(rt, "dora", p1, "neutral").feedback_id  # corrects f1
    from sqlmodel import Session

    with Session(rt.engine) as s:
        exs = user_examples(s, "dora")
        assert [(e.text, e.label) for e in exs] == [("second", "negative"), ("first", "neutral")]
        assert f1 not in [e.id for e in exs] and f3 in [e.id for e in exs]
        assert [(e.text, e.label) for e in user_examples(s, "dora", through_feedback_id=f1)] == [("first", "positive")]
