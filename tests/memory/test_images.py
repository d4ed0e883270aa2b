"""Checks on arriving images: format, bytes, pixels, decompression bombs, corrupt data."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from nightowl.memory.images import ImageRejected, ImageStore, decode_checked

LIMITS = dict(max_bytes=1_000_000, max_pixels=4_000_000, max_side=5000)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header that claims a huge canvas: the classic bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepts_ordinary_images(fmt):
    img = decode_checked(_encode(Image.new("RGB", (120, 80), (1, 2, 3)), fmt), **LIMITS)
    assert img.size == (120, 80) and img.mode == "RGB"


def test_palette_and_alpha_become_rgb():
    img = decode_checked(_encode(Image.new("RGBA", (10, 10), (1, 2, 3, 4)), "PNG"), **LIMITS)
    assert img.mode == "RGB"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, not an image", "could not be decoded"),
        (_png_claiming(60_000, 60_000), "pixels"),
        (_png_claiming(6000, 10), "per side"),
    ],
)
def test_refuses_bad_images(data, message):
    with pytest.raises(ImageRejected, match=message):
        decode_checked(data, **LIMITS)


def test_refuses_truncated_image():
    data = _encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageRejected, match="could not be decoded"):
        decode_checked(data[: len(data) // 2], **LIMITS)


def test_refuses_oversized_bytes():
    data = _encode(Image.effect_noise((300, 300), 80).convert("RGB"), "PNG")
    with pytest.raises(ImageRejected, match="bytes"):
        decode_checked(data, max_bytes=len(data) - 1, max_pixels=10**7, max_side=10**4)


def test_refuses_formats_we_do_not_take():
    data = _encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageRejected, match="not accepted"):
        decode_checked(data, **LIMITS)


def test_real_decompression_bomb_is_refused_before_decoding():
    # 100 million 1-bit pixels compress to a few kilobytes.
    data = _encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageRejected, match="pixels"):
        decode_checked(data, max_bytes=1_000_000, max_pixels=40_000_000, max_side=20_000)


def test_store_rejects_non_digest_names(tmp_path):
    store = ImageStore(tmp_path / "img", tmp_path / "feat")
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")
