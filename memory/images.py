"""Content-addressed image store (sha256) with checks on arrival and a cache of encoder features.

An image is decoded exactly once, when it arrives: it is checked (format, bytes, pixels,
decompression bombs), stored under its sha256, and its frozen image-encoder features are
computed and cached, so no later step (serving, nightly training) decodes it again.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from nightowl.io import atomic_write, atomic_write_bytes

# MPO: the multi-picture JPEG many phone cameras write (Pillow reads its first frame).
ALLOWED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ImageRejected(ValueError):
    """The upload is not an image we accept; the message says why (shown to the client)."""


def decode_checked(data: bytes, max_bytes: int, max_pixels: int, max_side: int) -> Image.Image:
    """Decode an untrusted upload, refusing anything odd before it costs memory."""
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
            # Checked from the header, before decoding: a small file that claims huge
            # dimensions is a decompression bomb.
            if width * height > max_pixels or max(width, height) > max_side:
                raise ImageRejected(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels and {max_side} per side"
                )
            probe.load()  # full decode: truncated or corrupt data fails here
            return probe.convert("RGB")
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image refused as a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"image could not be decoded: {exc}") from None
    except Exception as exc:  # a decoder's own failure on hostile bytes is still a bad image, not a crash
        raise ImageRejected(f"image could not be decoded ({type(exc).__name__})") from None


class ImageStore:
    def __init__(self, images_dir: Path, features_dir: Path):
        self.images_dir = images_dir
        self.features_dir = features_dir

    def _blob_path(self, sha: str) -> Path:
        if not _SHA256.match(sha):
            raise ValueError("not a sha256 hex digest")
        return self.images_dir / sha[:2] / sha

    def _features_path(self, sha: str, encoder_id: str) -> Path:
        # encoder_id is ours (not user input), but keep it to a safe file-name alphabet anyway.
        safe_encoder = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder_id)
        return self.features_dir / safe_encoder / sha[:2] / f"{sha}.safetensors"

    def put(
        self,
        data: bytes,
        max_bytes: int,
        max_pixels: int,
        max_side: int,
    ) -> tuple[str, Image.Image]:
        """Check and store an upload; returns (sha256, decoded RGB image)."""
        image = decode_checked(data, max_bytes, max_pixels, max_side)
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data)
        return sha, image

    def path(self, sha: str) -> Path:
        return self._blob_path(sha)

    def features(
        self, sha: str, encoder_id: str, encode: Callable[[Image.Image], torch.Tensor], image: Image.Image | None = None
    ) -> torch.Tensor:
        """The cached encoder features of an image, computed (once) if missing."""
        fpath = self._features_path(sha, encoder_id)
        if fpath.exists():
            return load_file(str(fpath))["features"]
        if image is None:
            # Stored blobs passed the checks on arrival; decoding one again is safe.
            image = Image.open(self._blob_path(sha)).convert("RGB")
        feats = encode(image).detach().to("cpu", torch.float32).contiguous()
        atomic_write(fpath, lambda tmp: save_file({"features": feats}, str(tmp)))
        return feats

    def delete(self, sha: str) -> None:
        """Remove an image and every cached feature of it."""
        self._blob_path(sha).unlink(missing_ok=True)
        for cached in self.features_dir.glob(f"*/{sha[:2]}/{sha}.safetensors"):
            cached.unlink(missing_ok=True)
