"""Content-addressed image store (sha256) with checks on arrival and a cache of encoder features.

An image is decoded once, when it arrives: it is checked (format, bytes, pixels, decompression
bombs), stored under its sha256, and its frozen image-encoder features are computed and cached,
so no later step (serving, nightly training) decodes it again.

Memory stays bounded: the encoder only ever sees a small centre square (224 px), so an image is
decoded *reduced* wherever the format allows it (JPEG's DCT scaling via ``draft``: a 40 MP photo
is decoded at 1/8 per side), reduced again right after decoding, and only ``max_concurrent_decodes``
decodes run at once. The pixel limit applies to what is actually decoded, so a format that can't
be decoded reduced (PNG, WebP, ...) is refused above it, from its header, before any pixel data is read.

The feature cache repairs itself: a torn or corrupt features file (truncated, wrong keys, shape or
dtype, non-finite values) is deleted and recomputed from the stored image instead of failing every
later read. A full disk is not hidden: the write's ``OSError`` (errno ENOSPC) reaches the caller
unchanged, for the API to answer as a storage error.

Deleting a blob is the caller's job under a reference check (see ``nightowl.day.logger``): the
store itself never knows who references an image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from nightowl.io import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

# MPO: the multi-picture JPEG many phone cameras write (Pillow reads its first frame).
ALLOWED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The shortest side an image is decoded at, when the format lets us choose: twice the encoder's
# 224 px input, so the centre crop it takes is still downscaled (not upscaled) to its input.
DECODE_SIDE = 448


class ImageRejected(ValueError):
    """The upload is not an image we accept; the message says why (shown to the client)."""


def _reduce(image: Image.Image, side: int) -> Image.Image:
    """Shrink by an integer factor (a box filter) while the shorter side stays >= ``side``."""
    factor = min(image.size) // side if side > 0 else 1
    return image.reduce(factor) if factor >= 2 else image


def decode_checked(
    data: bytes, max_bytes: int, max_pixels: int, max_side: int, decode_side: int = DECODE_SIDE
) -> Image.Image:
    """Decode an untrusted upload, refusing anything odd before it costs memory.

    ``max_pixels`` bounds the pixels actually decoded: a JPEG is decoded reduced (to a shorter side
    of at least ``decode_side``), so its limit is checked after that reduction; every other format
    is decoded at full size and checked from its header. ``max_side`` bounds the header's sides.
    The result is reduced to a shorter side of at most ~2x ``decode_side`` (0: keep full size).
    """
    if not data:
        raise ImageRejected("image is empty")
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))  # reads the header only
            fmt = probe.format
            width, height = probe.size
            if fmt not in ALLOWED_FORMATS:
                raise ImageRejected(f"image format {fmt} is not accepted; use one of {sorted(ALLOWED_FORMATS)}")
            if max(width, height) > max_side:
                raise ImageRejected(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels and {max_side} per side"
                )
            if decode_side > 0 and fmt in ("JPEG", "MPO"):
                # DCT scaling (1/2, 1/4, 1/8): the full-size pixels are never materialised.
                probe.draft("RGB", (decode_side, decode_side))
            # Checked from the header, before decoding: a small file that claims huge
            # dimensions is a decompression bomb.
            dw, dh = probe.size
            if dw * dh > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels and {max_side} per side"
                )
            probe.load()  # decode: truncated or corrupt data fails here
            image = _reduce(probe, decode_side)
            return image.convert("RGB")
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image refused as a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"image could not be decoded: {exc}") from None
    except Exception as exc:  # a decoder's own failure on hostile bytes is still a bad image, not a crash
        raise ImageRejected(f"image could not be decoded ({type(exc).__name__})") from None


class ImageStore:
    def __init__(
        self, images_dir: Path, features_dir: Path, max_concurrent_decodes: int = 2, decode_side: int = DECODE_SIDE
    ):
        self.images_dir = images_dir
        self.features_dir = features_dir
        self.decode_side = decode_side
        # Decoding is where an image costs memory (width x height x 3 bytes, and a copy to convert):
        # at most this many at once, process-wide; the rest wait their turn.
        self.max_concurrent_decodes = max(1, int(max_concurrent_decodes))
        self._decodes = threading.BoundedSemaphore(self.max_concurrent_decodes)
        self._count_lock = threading.Lock()
        self.active_decodes = 0
        self.peak_decodes = 0  # the most decodes seen at once (tests and benchmarks read it)
        # The shape of the features each encoder produced in this process: a cached file of
        # another shape is corrupt (or from another encoder build) and is recomputed.
        self._shapes: dict[str, tuple[int, ...]] = {}

    @contextmanager
    def _decode_slot(self) -> Iterator[None]:
        with self._decodes:
            with self._count_lock:
                self.active_decodes += 1
                self.peak_decodes = max(self.peak_decodes, self.active_decodes)
            try:
                yield
            finally:
                with self._count_lock:
                    self.active_decodes -= 1

    def _blob_path(self, sha: str) -> Path:
        if not _SHA256.match(sha):
            raise ValueError("not a sha256 hex digest")
        return self.images_dir / sha[:2] / sha

    def _features_path(self, sha: str, encoder_id: str) -> Path:
        # encoder_id is ours (not user input), but keep it to a safe file-name alphabet anyway.
        safe_encoder = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder_id)
        return self.features_dir / safe_encoder / sha[:2] / f"{sha}.safetensors"

    def decode(self, data: bytes, max_bytes: int, max_pixels: int, max_side: int) -> Image.Image:
        """``decode_checked`` within the bound on concurrent decodes, reduced for the encoder."""
        with self._decode_slot():
            return decode_checked(data, max_bytes, max_pixels, max_side, self.decode_side)

    def put(
        self,
        data: bytes,
        max_bytes: int,
        max_pixels: int,
        max_side: int,
    ) -> tuple[str, Image.Image]:
        """Check and store an upload; returns (sha256, decoded RGB image, reduced for the encoder).

        A full disk raises the write's ``OSError`` (errno ENOSPC) unchanged.
        """
        image = self.decode(data, max_bytes, max_pixels, max_side)
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data)
        return sha, image

    def path(self, sha: str) -> Path:
        return self._blob_path(sha)

    def exists(self, sha: str) -> bool:
        return self._blob_path(sha).is_file()

    def _load_features(self, fpath: Path, sha: str, encoder_id: str) -> torch.Tensor | None:
        """The cached features, or None when missing; a damaged file is deleted (and None)."""
        try:
            tensors = load_file(str(fpath))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - torn, truncated or not safetensors at all
            self._discard(fpath, f"unreadable ({type(exc).__name__}: {exc})")
            return None
        feats = tensors.get("features")
        if set(tensors) != {"features"} or feats is None:
            self._discard(fpath, f"holds {sorted(tensors)}, not 'features'")
            return None
        expected = self._shapes.get(encoder_id)
        if (
            feats.dtype != torch.float32
            or feats.ndim != 2
            or feats.numel() == 0
            or (expected is not None and tuple(feats.shape) != expected)
            or not bool(torch.isfinite(feats).all())
        ):
            self._discard(fpath, f"holds a {feats.dtype} tensor of shape {tuple(feats.shape)}")
            return None
        return feats

    @staticmethod
    def _discard(fpath: Path, why: str) -> None:
        log.warning("features file %s is %s: deleted, to be recomputed from the stored image", fpath, why)
        fpath.unlink(missing_ok=True)

    def _write_features(self, fpath: Path, feats: torch.Tensor) -> None:
        atomic_write(fpath, lambda tmp: save_file({"features": feats}, str(tmp)))

    def features(
        self, sha: str, encoder_id: str, encode: Callable[[Image.Image], torch.Tensor], image: Image.Image | None = None
    ) -> torch.Tensor:
        """The cached encoder features of an image, computed (once) if missing or damaged."""
        fpath = self._features_path(sha, encoder_id)
        feats = self._load_features(fpath, sha, encoder_id)
        if feats is not None:
            return feats
        if image is None:
            # Stored blobs passed the checks on arrival; decoding one again is safe (and bounded).
            with self._decode_slot(), Image.open(self._blob_path(sha)) as stored:
                if stored.format in ("JPEG", "MPO") and self.decode_side > 0:
                    stored.draft("RGB", (self.decode_side, self.decode_side))
                stored.load()
                image = _reduce(stored, self.decode_side).convert("RGB")
        feats = encode(image).detach().to("cpu", torch.float32).contiguous()
        self._shapes.setdefault(encoder_id, tuple(feats.shape))
        self._write_features(fpath, feats)
        return feats

    def restore(self, sha: str, data: bytes, encoder_id: str | None = None, feats: torch.Tensor | None = None) -> None:
        """Put back an image (and its features) that a concurrent collection removed.

        Called by the post's own transaction, under the same lock as collection: after it, the
        blob the post is about to reference exists.
        """
        path = self._blob_path(sha)
        if not path.is_file():
            atomic_write_bytes(path, data)
        if encoder_id is not None and feats is not None:
            fpath = self._features_path(sha, encoder_id)
            if not fpath.is_file():
                self._write_features(fpath, feats)

    def delete(self, sha: str) -> None:
        """Remove an image and every cached feature of it (callers check it is unreferenced)."""
        self._blob_path(sha).unlink(missing_ok=True)
        for cached in self.features_dir.glob(f"*/{sha[:2]}/{sha}.safetensors"):
            cached.unlink(missing_ok=True)

    def blobs(self) -> Iterator[tuple[str, Path]]:
        """Every stored image as (sha256, path): what a sweep for unreferenced blobs walks."""
        if not self.images_dir.is_dir():
            return
        for path in self.images_dir.glob("*/*"):
            if _SHA256.match(path.name) and path.is_file():
                yield path.name, path
