"""Rationale providers against real components: the packaged SmolLM2, a real HTTP server, real files."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nightowl import rationales
from nightowl.rationales import (
    CachedProvider,
    LocalGenerator,
    OpenAICompatible,
    ProviderUnavailable,
    RationaleCache,
    build_prompt,
    build_provider,
    file_sha256,
)
from nightowl.settings import Settings

TWEET = "The new iPhone battery dies by noon, but the camera is stunning."
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # only the bytes matter: nothing decodes it


# --------------------------------------------------------------------------- prompt

LABEL_WORDS = ("positive", "negative", "neutral")


@pytest.mark.parametrize("aspect", ["iPhone", None])
@pytest.mark.parametrize("has_image,sees_image", [(False, True), (True, True), (True, False)])
def test_prompt_never_asks_for_a_label(aspect, has_image, sees_image):
    messages = build_prompt(TWEET.replace("stunning", "great"), aspect, has_image, sees_image=sees_image)
    assert [m["role"] for m in messages] == ["system", "user"]
    prompt = " ".join(m["content"] for m in messages).lower()
    assert not any(word in prompt for word in LABEL_WORDS)
    assert "do not state a final sentiment label" in prompt
    assert "3 to 4 short sentences" in prompt
    if aspect:
        assert '"iphone"' in prompt
    assert ("cannot see" in prompt) == (has_image and not sees_image)
    assert ("attached image" in prompt) == (has_image and sees_image)


# --------------------------------------------------------------------------- local model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def converted(models_dir) -> tuple[LocalGenerator, str, float]:
    """One conversion per test run (~30-40 s on 2 CPU cores)."""
    gen = LocalGenerator("packaged", models_dir, device="auto")
    started = time.monotonic()
    rationale = gen.generate(TWEET, "iPhone")
    return gen, rationale, time.monotonic() - started


def test_local_generator_converts_once_and_generates(converted, models_dir):
    gen, rationale, _ = converted
    folder = models_dir / rationales.PACKAGED_MODEL
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in models_dir.iterdir()] == [rationales.PACKAGED_MODEL]  # no temp dir left
    assert gen.name == "local:smollm2-135m-instruct"
    assert isinstance(rationale, str) and rationale == rationale.strip() and len(rationale) > 20


def test_second_instance_loads_from_cache(converted, models_dir, monkeypatch):
    # If the GGUF were touched again, this would fail: the second load must come from the cache.
    def no_gguf():
        raise AssertionError("GGUF converted twice")

    monkeypatch.setattr(rationales, "packaged_gguf", no_gguf)
    gen = LocalGenerator("packaged", models_dir, device="cpu", max_new_tokens=24)
    out = gen.generate("Lunch at the new ramen place took an hour to arrive.", "service", Path("img.jpg"))
    assert out  # speed is the benchmark's business; the patched packaged_gguf proves the cache


def test_local_generator_bad_model_is_unavailable(tmp_path):
    gen = LocalGenerator(str(tmp_path / "no-such-model"))
    with pytest.raises(ProviderUnavailable, match="cannot load"):
        gen.generate(TWEET, None)


# --------------------------------------------------------------------------- HTTP server


class FakeOpenAI:
    """A real HTTP server on 127.0.0.1 speaking /v1/chat/completions, scripted per test."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, object, float]] = []  # (status, body, delay_s), popped per request
        self.default = (200, "Battery life and camera quality both concern the iPhone.", 0.0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                status, reply, delay = outer.script.pop(0) if outer.script else outer.default
                time.sleep(delay)
                if isinstance(reply, str):  # a plain completion
                    reply = {"choices": [{"message": {"role": "assistant", "content": f"  {reply}\n"}}]}
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def test_openai_text_only(server):
    p = OpenAICompatible(server.base_url, "teacher-7b", timeout_s=5)
    assert p.generate(TWEET, "iPhone") == "Battery life and camera quality both concern the iPhone."
    assert p.name == "openai:teacher-7b"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert "authorization" not in {k.lower() for k in req["headers"]}
    body = req["json"]
    assert body["model"] == "teacher-7b"
    user = body["messages"][-1]["content"]
    assert isinstance(user, str) and TWEET in user and "iPhone" in user


def test_openai_image_and_key(server, tmp_path):
    image = tmp_path / "abc123"  # stored images may have no suffix: the type is sniffed
    image.write_bytes(PNG)
    p = OpenAICompatible(server.base_url, "vision", api_key="sk-test", timeout_s=5)
    assert p.generate(TWEET, "camera", image)
    (req,) = server.requests
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    text_part, image_part = req["json"]["messages"][-1]["content"]
    assert text_part["type"] == "text" and TWEET in text_part["text"] and "attached image" in text_part["text"]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")


def test_openai_retries_5xx(server):
    server.script = [(500, {"error": "busy"}, 0), (503, {"error": "busy"}, 0)]
    p = OpenAICompatible(server.base_url, "m", timeout_s=5, retries=2, backoff_s=0.01)
    assert p.generate(TWEET, None)
    assert len(server.requests) == 3


def test_openai_gives_up_after_retries(server):
    server.script = [(500, {}, 0)] * 3
    p = OpenAICompatible(server.base_url, "m", timeout_s=5, retries=1, backoff_s=0.01)
    with pytest.raises(ProviderUnavailable, match="HTTP 500 after 2 attempt"):
        p.generate(TWEET, None)
    assert len(server.requests) == 2


def test_openai_refusal_is_not_retried(server):
    server.script = [(401, {"error": "bad key"}, 0)]
    p = OpenAICompatible(server.base_url, "m", timeout_s=5, retries=3, backoff_s=0.01)
    with pytest.raises(ProviderUnavailable, match="refused with HTTP 401"):
        p.generate(TWEET, None)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply", [b"<html>oops</html>", {"choices": []}, {"choices": [{"message": {"content": None}}]}]
)
def test_openai_malformed_response(server, reply):
    server.script = [(200, reply, 0)]
    p = OpenAICompatible(server.base_url, "m", timeout_s=5, retries=0)
    with pytest.raises(ProviderUnavailable, match="malformed response"):
        p.generate(TWEET, None)


def test_openai_empty_completion(server):
    server.script = [(200, "   ", 0)]
    with pytest.raises(ProviderUnavailable, match="empty"):
        OpenAICompatible(server.base_url, "m", retries=0).generate(TWEET, None)


def test_openai_server_down():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = OpenAICompatible(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2, retries=2, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        p.generate(TWEET, None)
    assert time.monotonic() - started < 5  # refused at once, not waited on


def test_openai_timeout(server):
    server.script = [(200, "late", 3.0)] * 2  # 6 s if the timeout were ignored
    p = OpenAICompatible(server.base_url, "m", timeout_s=0.2, retries=1, backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out"):
        p.generate(TWEET, None)
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_files(tmp_path):
    cache = RationaleCache(tmp_path / "rc")
    assert cache.get(TWEET, "iPhone", user_id="u1") is None
    with pytest.raises(ProviderUnavailable):
        cache.generate(TWEET, "iPhone", user_id="u1")
    path = cache.put(TWEET, "iPhone", None, "Some analysis.", provider="x", user_id="u1")
    assert path == cache.path(TWEET, "iPhone", None, "u1")
    assert path.parent.parent == cache.user_dir("u1")
    record = json.loads(path.read_text())
    assert record["rationale"] == "Some analysis." and TWEET not in path.read_text()  # the key names the text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert cache.generate(TWEET, "iPhone", user_id="u1") == "Some analysis."
    # Any part of the key changing is a miss.
    assert cache.get(TWEET, None, user_id="u1") is None
    assert cache.get(TWEET, "iPhone", "0" * 64, user_id="u1") is None
    path.write_text("{truncated")  # a damaged entry reads as a miss
    assert cache.get(TWEET, "iPhone", user_id="u1") is None


def test_cache_keeps_users_apart_and_names_nothing(tmp_path):
    """Issue 12 case 6: one user's entry is never another's hit (no timing oracle), and no file or
    folder name is a raw text, a plain sha256 of it, or a raw user id."""
    import hashlib

    cache = RationaleCache(tmp_path / "rc")
    cache.put(TWEET, None, None, "Alice's analysis.", user_id="alice")
    assert cache.get(TWEET, None, user_id="alice") == "Alice's analysis."
    assert cache.get(TWEET, None, user_id="bob") is None
    assert cache.get(TWEET, None) is None  # nor a shared hit
    names = {p.name for p in (tmp_path / "rc").rglob("*")}
    plain = hashlib.sha256(json.dumps([TWEET, None, None]).encode()).hexdigest()
    assert not any("alice" in n or plain in n or "iPhone" in n for n in names)
    key = tmp_path / "rc" / ".key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    # Another installation (another key) names the same entry differently: the names can't be
    # precomputed from a guessed text or user id.
    other = RationaleCache(tmp_path / "other")
    assert other.path(TWEET, None, None, "alice").name != cache.path(TWEET, None, None, "alice").name
    # The same folder read by a new instance (a restart) finds its entries again.
    assert RationaleCache(tmp_path / "rc").get(TWEET, None, user_id="alice") == "Alice's analysis."


def test_purge_user_removes_every_entry_of_that_user_only(tmp_path):
    cache = RationaleCache(tmp_path / "rc")
    assert cache.purge_user("nobody") is False  # no key yet: nothing to purge, nothing created
    for i in range(5):
        cache.put(f"alice's secret {i}", None, None, f"analysis {i}", user_id="alice")
    cache.put("bob's words", None, None, "bob's analysis", user_id="bob")
    cache.put("teacher text", None, None, "shared analysis")  # an operator's shared entry
    assert cache.purge_user("alice") is True
    assert not cache.user_dir("alice").exists()
    assert all(cache.get(f"alice's secret {i}", None, user_id="alice") is None for i in range(5))
    assert cache.get("bob's words", None, user_id="bob") == "bob's analysis"
    assert cache.get("teacher text", None, user_id="carol") == "shared analysis"
    assert not list((tmp_path / "rc" / "users").glob(".purge-*"))
    assert cache.purge_user("alice") is False


def test_legacy_plaintext_entries_go_and_imports_are_kept(tmp_path):
    """The unkeyed layout stored users' texts in plain JSON: the first keyed use drops them, but
    keeps imported teacher rationales (now shared)."""
    rc = tmp_path / "rc"
    (rc / "ab").mkdir(parents=True)
    (rc / "ab" / ("ab" + "0" * 62 + ".json")).write_text(
        json.dumps({"text": "a user's words", "aspect": None, "image_sha256": None, "rationale": "r", "provider": "openai:m"})
    )
    (rc / "ab" / ("ab" + "1" * 62 + ".json")).write_text(
        json.dumps({"text": "teacher", "aspect": "x", "image_sha256": None, "rationale": "t", "provider": "import:t.jsonl"})
    )
    cache = RationaleCache(rc)
    assert cache.get("teacher", "x", user_id="anyone") == "t"
    assert not (rc / "ab").exists()
    assert not any("a user's words" in p.read_text() for p in rc.rglob("*.json"))


def test_cached_provider_generates_once(server, tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(PNG)
    cache = RationaleCache(tmp_path / "rc")
    server.default = (200, "Slow but fine.", 0.3)
    p = CachedProvider(OpenAICompatible(server.base_url, "m", timeout_s=5), cache)
    assert p.name == "openai:m"
    # Concurrent requests for the same post wait for one generation.
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(p.generate(TWEET, "camera", image, user_id="u")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["Slow but fine."] * 3
    assert p.generate(TWEET, "camera", image, user_id="u") == "Slow but fine."
    assert len(server.requests) == 1
    assert cache.get(TWEET, "camera", file_sha256(image), user_id="u") == "Slow but fine."
    p.generate(TWEET, "battery", image, user_id="u")  # another aspect: another generation
    assert len(server.requests) == 2
    # Another user posting the same text is not served from the first user's entry.
    p.generate(TWEET, "camera", image, user_id="v")
    assert len(server.requests) == 3
    # Without a user nothing is written: a text no one owns is never a hit for anyone.
    p.generate("ownerless", None)
    p.generate("ownerless", None)
    assert len(server.requests) == 5
    assert cache.get("ownerless", None) is None


def test_cached_provider_does_not_cache_failures(tmp_path):
    class Down:
        name = "down"

        def generate(self, text, aspect, image_path=None):
            raise ProviderUnavailable("down")

    p = CachedProvider(Down(), RationaleCache(tmp_path))
    with pytest.raises(ProviderUnavailable):
        p.generate(TWEET, None, user_id="u")
    assert not any(tmp_path.rglob("*.json"))


def test_import_jsonl(tmp_path):
    (tmp_path / "pics").mkdir()
    image = tmp_path / "pics" / "a.png"
    image.write_bytes(PNG)
    rows = [
        {"text": TWEET, "aspect": "iPhone", "rationale": "About the phone."},
        {"text": TWEET, "aspect": None, "image_path": "pics/a.png", "rationale": "With a picture."},
        {"text": "plain", "image_sha256": "f" * 64, "rationale": "By hash."},
    ]
    src = tmp_path / "teacher.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cache = RationaleCache(tmp_path / "rc")
    assert cache.import_jsonl(src) == 3
    # Imported rationales are shared: every user (and a provider without a user) reads them.
    assert cache.generate(TWEET, "iPhone") == "About the phone."
    assert cache.generate(TWEET, "iPhone", user_id="anyone") == "About the phone."
    assert cache.generate(TWEET, None, image, user_id="u2") == "With a picture."
    assert cache.get("plain", None, "f" * 64) == "By hash."
    assert not (tmp_path / "rc" / "users").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "new", "rationale": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        cache.import_jsonl(bad)
    assert cache.get("new", None) is None  # nothing from a bad file is imported


def test_generate_for_tells_caching_providers_whose_post_it_is(tmp_path):
    class Plain:  # a provider that knows nothing of users (the LM itself, a test double)
        name = "plain"

        def generate(self, text, aspect, image_path=None):
            return f"about {text}"

    cache = RationaleCache(tmp_path / "rc")
    assert rationales.generate_for(Plain(), "u", "x", None) == "about x"
    p = CachedProvider(Plain(), cache)
    assert rationales.generate_for(p, "u", "x", None) == "about x"
    assert cache.get("x", None, user_id="u") == "about x"
    rationales.forget_for(p, "u", "x", None, None)
    assert cache.get("x", None, user_id="u") is None


# --------------------------------------------------------------------------- factory


def test_build_provider(tmp_path):
    assert build_provider(Settings(home=tmp_path, rationale_provider="none")) is None
    cache = build_provider(Settings(home=tmp_path, rationale_provider="cache"))
    assert isinstance(cache, RationaleCache) and cache.dir == tmp_path / "rationale_cache"
    local = build_provider(Settings(home=tmp_path, rationale_provider="local"))
    assert isinstance(local, CachedProvider) and isinstance(local.inner, LocalGenerator)
    assert local.inner._model is None  # lazy: nothing loaded until the first generation
    openai = build_provider(
        Settings(home=tmp_path, rationale_provider="openai", openai={"model": "gpt-x", "api_key": "k"})
    )
    assert isinstance(openai, CachedProvider) and openai.name == "openai:gpt-x"
    assert isinstance(openai.inner, OpenAICompatible)
