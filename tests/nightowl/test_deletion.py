"""Issue 12, cases 3, 6 and 7: deletion that is complete and race-safe for images and the rationale
cache, and an image store that repairs its feature cache and reports a full disk."""

from __future__ import annotations

import base64
import errno
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from safetensors.torch import load_file
from sqlmodel import Session, func, select

from nightowl.day import logger
from nightowl.day.rationale_worker import RationaleWorker
from nightowl.errors import NotFound
from nightowl.memory.models import Post, Rationale
from nightowl.rationales import CachedProvider, RationaleCache
from nightowl.runtime import Runtime
from tests.conftest import admin_headers, make_settings


@pytest.fixture
def fast_runtime(tmp_path, db_url, predictor):
    """The real store (both backends) and the real model, shared across tests."""
    rt = Runtime(make_settings(tmp_path / "fast-home", database_url=db_url), predictor=predictor)
    yield rt
    rt.close()


def _png(seed: int, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed % 256, (seed // 256) % 256, 77)).save(buf, format="PNG")
    return buf.getvalue()


def _files(rt) -> tuple[set[str], set[str]]:
    """The shas of the stored blobs, and of the cached features."""
    blobs = {p.name for p in rt.settings.images_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}
    feats = {p.name.removesuffix(".safetensors") for p in rt.settings.features_dir.rglob("*.safetensors")}
    return blobs, feats


def _referenced(rt) -> set[str]:
    with Session(rt.engine) as s:
        return {sha for sha in s.exec(select(Post.image_sha256)) if sha}


def _assert_no_orphans(rt) -> None:
    blobs, feats = _files(rt)
    used = _referenced(rt)
    assert blobs <= used, f"{len(blobs - used)} image file(s) no post references"
    assert feats <= used, f"{len(feats - used)} features file(s) no post references"
    assert used <= blobs, "a post references an image that is gone"
    assert not [p for p in rt.settings.images_dir.rglob(".*.tmp")]


def _resolves(rt, sha: str) -> None:
    """An acknowledged post's image: the file exists, and its features load (cached or recomputed)."""
    assert rt.images.path(sha).is_file()
    enc = rt.predictor.image_encoder
    assert rt.images.features(sha, enc.encoder_id, enc.encode).ndim == 2


# --------------------------------------------------------------------------- case 3: images racing a DELETE


def test_image_posts_racing_delete_never_fail_and_leave_no_files(fast_runtime):
    rt = fast_runtime
    logger.create_user(rt, "racer")
    outcomes: list[str] = []
    lock = threading.Lock()
    some_stored = threading.Event()

    def post(i: int) -> None:
        try:
            # Some bytes repeat: the same blob posted several times by the user being deleted.
            logger.log_post(rt, "racer", f"post {i}", image=_png(i % 40))
            result = "ok"
        except NotFound:
            result = "404"
        except Exception as exc:  # noqa: BLE001 - anything else is what the API would answer as a 5xx
            result = f"error {type(exc).__name__}: {exc}"
        with lock:
            outcomes.append(result)
            if len(outcomes) >= 20:
                some_stored.set()

    def delete() -> None:
        assert some_stored.wait(60)  # some posts stored, others in flight
        logger.delete_user(rt, "racer")

    deleter = threading.Thread(target=delete)
    deleter.start()
    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(post, i) for i in range(100)]:
            f.result(120)
    deleter.join(60)
    errors = [o for o in outcomes if o.startswith("error")]
    assert not errors, errors[:5]
    assert len(outcomes) == 100 and "404" in outcomes
    _assert_no_orphans(rt)
    assert _files(rt) == (set(), set())


def test_api_image_posts_racing_delete_get_no_5xx(client, sqlite_runtime):
    r = client.post("/v1/users", json={"user_id": "apirace"}, headers=admin_headers())
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    images = [base64.b64encode(_png(1000 + i)).decode() for i in range(30)]

    def post(i: int) -> int:
        return client.post(
            "/v1/users/apirace/posts", json={"text": f"p {i}", "image_base64": images[i]}, headers=headers
        ).status_code

    def delete() -> int:
        time.sleep(0.1)
        return client.delete("/v1/users/apirace", headers=admin_headers()).status_code

    with ThreadPoolExecutor(6) as pool:
        posts = [pool.submit(post, i) for i in range(30)]
        deleted = pool.submit(delete)
        codes = [f.result(120) for f in posts]
    assert deleted.result() == 200
    assert not [c for c in codes if c >= 500], codes
    _assert_no_orphans(sqlite_runtime)


def test_a_post_whose_user_is_deleted_meanwhile_is_404_and_its_image_collected(fast_runtime, monkeypatch):
    rt = fast_runtime
    logger.create_user(rt, "gone")
    real = rt.active_adapter

    def delete_first(user_id):  # runs after the image is stored, before the post's transaction
        logger.delete_user(rt, "gone")
        return real(user_id)

    monkeypatch.setattr(rt, "active_adapter", delete_first)
    with pytest.raises(NotFound, match="unknown user"):
        logger.log_post(rt, "gone", "my picture", image=_png(7))
    assert _files(rt) == (set(), set())


def test_a_post_for_a_user_recreated_meanwhile_is_not_given_to_the_new_user(fast_runtime, monkeypatch):
    rt = fast_runtime
    logger.create_user(rt, "reborn")
    real = rt.active_adapter

    def recreate(user_id):
        monkeypatch.setattr(rt, "active_adapter", real)
        logger.delete_user(rt, "reborn")
        time.sleep(0.01)  # a new incarnation (created_at) for the same id
        logger.create_user(rt, "reborn")
        return real(user_id)

    monkeypatch.setattr(rt, "active_adapter", recreate)
    with pytest.raises(NotFound):
        logger.log_post(rt, "reborn", "the old owner's words", image=_png(8))
    assert logger.list_posts(rt, "reborn").total == 0
    assert _files(rt) == (set(), set())


TRIALS = int(os.environ.get("NIGHTOWL_SHARED_IMAGE_TRIALS", "200"))


def test_a_shared_image_survives_the_deletion_of_one_owner(fast_runtime):
    """200 trials: A posted an image, B posts the same bytes while A is deleted; every post of B's
    that was acknowledged still resolves (file exists, features load)."""
    rt = fast_runtime
    acknowledged: list[str] = []
    for trial in range(TRIALS):
        a, b = f"a{trial}", f"b{trial}"
        logger.create_user(rt, a)
        logger.create_user(rt, b)
        data = _png(2000 + trial, size=(16, 16))
        logger.log_post(rt, a, "mine first", image=data)
        go = threading.Barrier(2)

        def delete_a(go=go, a=a):
            go.wait(30)
            logger.delete_user(rt, a)

        deleter = threading.Thread(target=delete_a)
        deleter.start()
        go.wait(30)
        out = logger.log_post(rt, b, "the same picture", image=data)
        deleter.join(30)
        acknowledged.append(out.image_sha256)
        _resolves(rt, out.image_sha256)
    for sha in acknowledged:
        _resolves(rt, sha)
    _assert_no_orphans(rt)


def test_delete_keeps_an_image_another_user_posted(fast_runtime):
    rt = fast_runtime
    for u in ("owner1", "owner2"):
        logger.create_user(rt, u)
    data = _png(3)
    sha = logger.log_post(rt, "owner1", "x", image=data).image_sha256
    logger.log_post(rt, "owner2", "y", image=data)
    assert logger.delete_user(rt, "owner1")["images"] == 0
    _resolves(rt, sha)
    assert logger.delete_user(rt, "owner2")["images"] == 1
    assert _files(rt) == (set(), set())


def test_collect_unreferenced_images_sweeps_only_old_orphans(fast_runtime):
    rt = fast_runtime
    logger.create_user(rt, "keeper")
    kept = logger.log_post(rt, "keeper", "x", image=_png(11)).image_sha256
    old_orphan, _ = rt.images.put(_png(12), 10**6, 10**7, 10**4)  # as if a crash left it
    new_orphan, _ = rt.images.put(_png(13), 10**6, 10**7, 10**4)  # an upload in flight
    past = time.time() - 7200
    os.utime(rt.images.path(old_orphan), (past, past))
    os.utime(rt.images.path(kept), (past, past))
    assert logger.collect_unreferenced_images(rt, older_than_s=3600) == 1
    assert not rt.images.path(old_orphan).exists()
    assert rt.images.path(kept).exists() and rt.images.path(new_orphan).exists()


# --------------------------------------------------------------------------- case 6: the rationale cache


class _Plain:
    name = "plain"

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()

    def generate(self, text, aspect, image_path=None):
        self.started.set()
        assert self.release.wait(30)
        return f"An analysis of: {text}"


def _cache_text(rt) -> str:
    root = rt.settings.rationale_cache_dir
    return "".join(p.read_text("utf-8", "replace") for p in root.rglob("*") if p.is_file() and p.suffix == ".json")


def _worker_runtime(tmp_path, predictor):
    return Runtime(make_settings(tmp_path / "home", rationale_provider="local"), predictor=predictor)


def test_after_delete_the_rationale_cache_holds_none_of_the_users_text(tmp_path, predictor):
    rt = _worker_runtime(tmp_path, predictor)
    cache = RationaleCache(rt.settings.rationale_cache_dir)
    worker = RationaleWorker(rt, provider=CachedProvider(_Plain(), cache))
    logger.create_user(rt, "dee")
    logger.create_user(rt, "eve")
    logger.log_post(rt, "dee", "dee's private diary entry")
    logger.log_post(rt, "eve", "eve's own words")
    assert worker.run_once() == 2
    assert cache.get("dee's private diary entry", None, user_id="dee")
    # Another user posting dee's text is no hit: the cache is no oracle for what dee posted.
    assert cache.get("dee's private diary entry", None, user_id="eve") is None

    logger.delete_user(rt, "dee")
    assert not cache.user_dir("dee").exists()
    assert "dee's" not in _cache_text(rt)
    assert cache.get("eve's own words", None, user_id="eve")  # other users keep theirs
    rt.close()


def test_a_rationale_finished_after_its_user_was_deleted_is_not_cached(tmp_path, predictor):
    rt = _worker_runtime(tmp_path, predictor)
    cache = RationaleCache(rt.settings.rationale_cache_dir)
    slow = _Plain()
    slow.release.clear()
    worker = RationaleWorker(rt, provider=CachedProvider(slow, cache))
    logger.create_user(rt, "fay")
    post = logger.log_post(rt, "fay", "fay's words, written while she leaves")
    assert worker.claim_due() == [post.post_id]
    working = threading.Thread(target=worker.work_one, args=(post.post_id,))
    working.start()
    assert slow.started.wait(30)
    logger.delete_user(rt, "fay")  # purges the cache before the provider has answered
    slow.release.set()
    working.join(30)
    assert "fay's words" not in _cache_text(rt)
    with Session(rt.engine) as s:
        assert s.exec(select(func.count()).select_from(Rationale)).one() == 0
    rt.close()


# --------------------------------------------------------------------------- case 7: feature cache, full disk


def test_a_corrupt_features_file_is_repaired_by_the_next_post(sqlite_runtime):
    rt = sqlite_runtime
    logger.create_user(rt, "gus")
    data = _png(21)
    sha = logger.log_post(rt, "gus", "first", image=data).image_sha256
    (fpath,) = rt.settings.features_dir.rglob(f"{sha}.safetensors")
    good = load_file(str(fpath))["features"]
    fpath.write_bytes(fpath.read_bytes()[:100])  # torn
    out = logger.log_post(rt, "gus", "second", image=data)  # not a 500
    assert out.image_sha256 == sha
    assert load_file(str(fpath))["features"].shape == good.shape  # rewritten whole
    (fpath,) = rt.settings.features_dir.rglob(f"{sha}.safetensors")
    fpath.write_bytes(b"")  # emptied: the night's read repairs it too
    enc = rt.predictor.image_encoder
    assert rt.images.features(sha, enc.encoder_id, enc.encode).shape == good.shape


def test_a_full_image_store_raises_enospc_and_stores_nothing(sqlite_runtime, monkeypatch):
    from nightowl.memory import images

    rt = sqlite_runtime
    logger.create_user(rt, "hal")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(images, "atomic_write_bytes", full)
    with pytest.raises(OSError) as caught:
        logger.log_post(rt, "hal", "a picture", image=_png(31))
    assert caught.value.errno == errno.ENOSPC
    assert logger.list_posts(rt, "hal").total == 0
    assert _files(rt) == (set(), set())
