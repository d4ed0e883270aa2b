"""Checks on arriving images: format, bytes, pixels, decompression bombs, corrupt data."""

from __future__ import annotations

import errno
import hashlib
import io
import struct
import threading
import time
import zlib

import pytest
import torch
from nightowl.memory.images import ImageRejected, ImageStore, decode_checked
from PIL import Image
from safetensors.torch import load_file, save_file

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


# --------------------------------------------------------------------------- bounded memory (issue 12, case 4)


def _defaults() -> dict:
    from nightowl.settings import LimitSettings

    d = LimitSettings()
    return {"max_bytes": d.max_image_bytes, "max_pixels": d.max_image_pixels, "max_side": d.max_image_side}


def test_a_40_megapixel_png_is_refused_by_default_from_its_header():
    # The attack: a small file (a few hundred KB at most) that decodes to 40 MP.
    data = _encode(Image.new("1", (8000, 5000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageRejected, match="pixels"):
        decode_checked(data, **_defaults())


def test_a_40_megapixel_jpeg_is_decoded_reduced():
    data = _encode(Image.new("L", (8000, 5000), 128), "JPEG")
    # The pixel limit bounds what is decoded: far below 40 MP, yet the JPEG passes, because
    # it is decoded at 1/8 per side (DCT scaling) and never at full size.
    img = decode_checked(data, max_bytes=10**8, max_pixels=1_000_000, max_side=12_000)
    assert img.mode == "RGB"
    assert img.size == (1000, 625)
    # Still large enough for the encoder's 224 px centre square to be downscaled, not upscaled.
    assert min(img.size) >= 224
    img = decode_checked(data, **_defaults())
    assert img.size[0] * img.size[1] <= 1_000_000


def test_a_large_png_within_the_limit_is_reduced_after_decoding():
    data = _encode(Image.new("RGB", (3000, 2000), (10, 20, 30)), "PNG")
    img = decode_checked(data, **_defaults())
    assert img.size == (750, 500)  # reduced by 4: the shorter side stays >= 448
    assert img.getpixel((10, 10)) == (10, 20, 30)


def test_concurrent_decodes_never_exceed_the_bound(tmp_path, monkeypatch):
    from nightowl.memory import images

    store = ImageStore(tmp_path / "img", tmp_path / "feat", max_concurrent_decodes=2)
    active = peak = 0
    lock = threading.Lock()
    real = images.decode_checked

    def slow_decode(*args, **kwargs):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(images, "decode_checked", slow_decode)
    uploads = [_encode(Image.new("RGB", (64, 64), (i, 0, 0)), "PNG") for i in range(12)]
    threads = [threading.Thread(target=store.put, args=(u,), kwargs=LIMITS) for u in uploads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2 and store.peak_decodes == 2
    assert len(list((tmp_path / "img").rglob("*"))) == 12 + len({hashlib.sha256(u).hexdigest()[:2] for u in uploads})


# --------------------------------------------------------------------------- a self-repairing feature cache (case 7)


def _stored(tmp_path) -> tuple[ImageStore, str, Image.Image]:
    store = ImageStore(tmp_path / "img", tmp_path / "feat")
    sha, img = store.put(_encode(Image.new("RGB", (40, 30), (9, 9, 9)), "PNG"), **LIMITS)
    return store, sha, img


class _Encoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return torch.full((4, 8), 0.5)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # torn write
        lambda p: p.write_bytes(b""),  # empty
        lambda p: p.write_bytes(b"\x00" * 64),  # garbage
        lambda p: save_file({"features": torch.zeros(3)}, str(p)),  # wrong shape (1-D)
        lambda p: save_file({"features": torch.zeros(4, 7)}, str(p)),  # another shape than the encoder's
        lambda p: save_file({"features": torch.zeros(4, 8, dtype=torch.float16)}, str(p)),  # wrong dtype
        lambda p: save_file({"features": torch.full((4, 8), float("nan"))}, str(p)),  # not finite
        lambda p: save_file({"other": torch.zeros(4, 8)}, str(p)),  # wrong key
    ],
)
def test_a_damaged_features_file_is_recomputed_and_rewritten(tmp_path, damage):
    store, sha, img = _stored(tmp_path)
    encode = _Encoder()
    first = store.features(sha, "enc", encode, img)
    fpath = store._features_path(sha, "enc")
    damage(fpath)
    again = store.features(sha, "enc", encode)  # from the stored image: no decoded image given
    assert torch.equal(again, first) and encode.calls == 2
    assert torch.equal(load_file(str(fpath))["features"], first)  # the file was rewritten
    assert store.features(sha, "enc", encode) is not None and encode.calls == 2  # and is good again


def test_a_features_file_removed_while_read_is_recomputed(tmp_path):
    store, sha, img = _stored(tmp_path)
    encode = _Encoder()
    store.features(sha, "enc", encode, img)
    store._features_path(sha, "enc").unlink()
    assert store.features(sha, "enc", encode).shape == (4, 8) and encode.calls == 2


def test_a_full_disk_is_reported_as_enospc_not_as_a_bad_image(tmp_path, monkeypatch):
    from nightowl.memory import images

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(images, "atomic_write_bytes", full)
    store = ImageStore(tmp_path / "img", tmp_path / "feat")
    with pytest.raises(OSError) as caught:
        store.put(_encode(Image.new("RGB", (8, 8)), "PNG"), **LIMITS)
    assert caught.value.errno == errno.ENOSPC and not isinstance(caught.value, ImageRejected)
