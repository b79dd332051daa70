"""Tests for nstlab.images. Every input file is generated in tmp_path."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nstlab import images
from nstlab.errors import ImageError
from nstlab.images import (
    MAX_PIXELS,
    check_min_size,
    file_sha256,
    load_image,
    resize_long_side,
    resize_to,
    save_image,
    to_pil,
    to_tensor,
    write_text_atomic,
)


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A minimal PNG built by hand, so headers can claim any size and any bit depth."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _open(path: Path) -> Image.Image:
    """Read a file fully and close it (a bare Image.open() leaks the handle until garbage collection)."""
    with Image.open(path) as img:
        img.load()
        copy: Image.Image = img.copy()
    return copy


def _stored_mode(path: Path) -> str:
    with Image.open(path) as img:
        mode: str = img.mode
    return mode


def _px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert img.mode == "RGB"
    assert img.size == size


def _assert_error(exc: pytest.ExceptionInfo[ImageError], path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message


# --- mode conversions ---------------------------------------------------------------------------


def test_rgb_passes_through_exactly(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    _assert_rgb(img, (7, 5))
    np.testing.assert_array_equal(np.asarray(img), arr)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, 77), ("1", 1, 255), ("1", 0, 0)])
def test_greyscale_and_bilevel(tmp_path: Path, mode: str, value: int, expected: int) -> None:
    Image.new(mode, (3, 2), value).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    _assert_rgb(img, (3, 2))
    assert _px(img) == (expected,) * 3


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red → white
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red → pink
    rgba.putpixel((2, 0), (10, 20, 30, 255))  # opaque → unchanged
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    _assert_rgb(img, (3, 1))
    assert _px(img, (0, 0)) == (255, 255, 255)
    r, g, b = _px(img, (1, 0))
    assert r == 255 and abs(g - 128) <= 1 and abs(b - 128) <= 1
    assert _px(img, (2, 0)) == (10, 20, 30)


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (40, 255))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert _px(img, (0, 0)) == (255, 255, 255)
    assert _px(img, (1, 0)) == (40, 40, 40)


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_palette_with_transparency(tmp_path: Path, ext: str) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / f"p{ext}", transparency=0)
    img = load_image(tmp_path / f"p{ext}")
    _assert_rgb(img, (2, 1))
    assert _px(img, (0, 0)) == (255, 255, 255)  # palette index 0 is transparent
    assert _px(img, (1, 0)) == (0, 0, 255)


def test_palette_without_transparency(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (4, 4), (12, 200, 99))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert _stored_mode(tmp_path / "p.png") == "P"
    img = load_image(tmp_path / "p.png")
    _assert_rgb(img, (4, 4))
    assert _px(img) == (12, 200, 99)


@pytest.mark.parametrize("ext", [".jpg", ".tif"])
def test_cmyk(tmp_path: Path, ext: str) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / f"c{ext}")
    assert _stored_mode(tmp_path / f"c{ext}") == "CMYK"
    img = load_image(tmp_path / f"c{ext}")
    _assert_rgb(img, (8, 8))
    r, g, b = _px(img, (4, 4))
    assert r > 240 and g < 15 and b < 15


def test_ycbcr_tiff(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (200, 30, 60)).convert("YCbCr").save(tmp_path / "y.tif")
    assert _stored_mode(tmp_path / "y.tif") == "YCbCr"
    img = load_image(tmp_path / "y.tif")
    _assert_rgb(img, (4, 4))
    assert all(abs(a - b) <= 3 for a, b in zip(_px(img), (200, 30, 60), strict=True))


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    raw = b"\x00" + struct.pack(">HHHH", 0, 1000, 32768, 65535)
    (tmp_path / "g16.png").write_bytes(_png_bytes(4, 1, 16, 0, raw))
    assert _stored_mode(tmp_path / "g16.png") == "I;16"
    img = load_image(tmp_path / "g16.png")
    _assert_rgb(img, (4, 1))
    grey = [_px(img, (x, 0))[0] for x in range(4)]
    assert grey[0] == 0 and grey[3] == 255
    assert abs(grey[1] - 4) <= 1  # 1000 / 257 ≈ 3.9, not clipped to 255
    assert abs(grey[2] - 128) <= 1


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    Image.frombytes("I;16B", (3, 1), struct.pack(">HHH", 0, 32768, 65535)).save(tmp_path / "b.tif")
    assert _stored_mode(tmp_path / "b.tif") == "I;16B"
    img = load_image(tmp_path / "b.tif")
    assert [_px(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0, 100, 255], [0, 100, 255]), ([0, 32768, 65535], [0, 128, 255]), ([-5, 70000, 1], [0, 255, 0])],
)
def test_int32_mode(tmp_path: Path, values: list[int], expected: list[int]) -> None:
    Image.fromarray(np.array([values], dtype=np.int32)).save(tmp_path / "i.tif")
    assert _stored_mode(tmp_path / "i.tif") == "I"
    img = load_image(tmp_path / "i.tif")
    assert [_px(img, (x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(
    ("values", "expected"), [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 300.0], [0, 100, 255])]
)
def test_float_mode(tmp_path: Path, values: list[float], expected: list[int]) -> None:
    Image.fromarray(np.array([values], dtype=np.float32)).save(tmp_path / "f.tif")
    assert _stored_mode(tmp_path / "f.tif") == "F"
    img = load_image(tmp_path / "f.tif")
    _assert_rgb(img, (3, 1))
    assert [_px(img, (x, 0))[0] for x in range(3)] == expected


def test_16bit_rgba_png(tmp_path: Path) -> None:
    raw = b"\x00" + struct.pack(">HHHH", 65535, 0, 0, 0) + struct.pack(">HHHH", 0, 65535, 0, 65535)
    (tmp_path / "rgba16.png").write_bytes(_png_bytes(2, 1, 16, 6, raw))
    img = load_image(tmp_path / "rgba16.png")
    _assert_rgb(img, (2, 1))
    assert _px(img, (0, 0)) == (255, 255, 255)
    assert _px(img, (1, 0)) == (0, 255, 0)


def test_16bit_grey_alpha_png(tmp_path: Path) -> None:
    (tmp_path / "la16.png").write_bytes(_png_bytes(1, 1, 16, 4, b"\x00" + struct.pack(">HH", 0, 65535)))
    assert _px(load_image(tmp_path / "la16.png")) == (0, 0, 0)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)  # left half red
    arr[:, 16:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "o.jpg")
    _assert_rgb(img, (16, 32))
    # Rotating clockwise moves the stored left half to the top.
    r, _, b = _px(img, (8, 4))
    assert r > 200 and b < 60
    r, _, b = _px(img, (8, 28))
    assert b > 200 and r < 60


def test_file_handle_is_closed(tmp_path: Path) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    load_image(tmp_path / "a.png")
    os.replace(tmp_path / "a.png", tmp_path / "b.png")  # would fail on Windows with an open handle
    os.remove(tmp_path / "b.png")
    assert not list(tmp_path.iterdir())


# --- loading errors -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found") as exc:
        load_image(tmp_path / "nope.png")
    _assert_error(exc, tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory") as exc:
        load_image(tmp_path)
    _assert_error(exc, tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").touch()
    with pytest.raises(ImageError, match="empty") as exc:
        load_image(tmp_path / "empty.png")
    _assert_error(exc, tmp_path / "empty.png")


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("hello, I am not a picture\nsecond line\n")
    with pytest.raises(ImageError, match="not an image") as exc:
        load_image(tmp_path / "fake.png")
    _assert_error(exc, tmp_path / "fake.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"t{ext}")
    data = (tmp_path / f"t{ext}").read_bytes()
    (tmp_path / f"t{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as exc:
        load_image(tmp_path / f"t{ext}")
    _assert_error(exc, tmp_path / f"t{ext}")


def test_bomb_via_small_max_pixels(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    load_image(tmp_path / "a.png", max_pixels=200)  # exactly at the limit is fine
    with pytest.raises(ImageError, match="too many pixels") as exc:
        load_image(tmp_path / "a.png", max_pixels=199)
    _assert_error(exc, tmp_path / "a.png")
    assert "20×10" in str(exc.value)


@pytest.mark.parametrize("side", [10_000, 20_000])  # above Pillow's warning and its hard-error thresholds
def test_bomb_via_real_png_header(tmp_path: Path, side: int) -> None:
    # Header claims side×side pixels; the body is empty, so this is cheap unless something decodes it.
    (tmp_path / "bomb.png").write_bytes(_png_bytes(side, side, 1, 0, b""))
    assert side * side > MAX_PIXELS
    with pytest.raises(ImageError, match="too many pixels") as exc:
        load_image(tmp_path / "bomb.png")
    _assert_error(exc, tmp_path / "bomb.png")


def test_raised_max_pixels_lets_pillow_warning_through(tmp_path: Path) -> None:
    # 100 Mpx is above Pillow's warning threshold; with a higher max_pixels the guard must not fire,
    # so the (empty) body is reached and reported as corrupt instead.
    (tmp_path / "big.png").write_bytes(_png_bytes(10_000, 10_000, 1, 0, b""))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(tmp_path / "big.png", max_pixels=150_000_000)


# --- tensors and resizing -----------------------------------------------------------------------


def test_tensor_round_trip_is_exact() -> None:
    arr = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    img = Image.fromarray(arr.astype(np.uint8))
    t = to_tensor(img)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32 and t.is_contiguous()
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    assert t[0, 1, 0, 0].item() == pytest.approx(1 / 255)  # channel 1 of pixel (0, 0) is 1
    back = to_pil(t)
    assert back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), arr)
    np.testing.assert_array_equal(np.asarray(to_pil(t[0])), arr)


def test_to_pil_clamps_and_rounds() -> None:
    t = torch.tensor([-1.0, 2.0, 0.5, float("nan")]).view(1, 1, 4).expand(3, 1, 4)
    assert [_px(to_pil(t), (x, 0))[0] for x in range(4)] == [0, 255, 128, 0]


def test_to_pil_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        to_pil(torch.zeros(1, 4, 2, 2))


def test_to_tensor_converts_rgba_on_white() -> None:
    t = to_tensor(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert t.shape == (1, 3, 2, 2) and bool((t == 1.0).all())


@pytest.mark.parametrize(
    ("size_in", "long_side", "size_out"),
    [
        ((400, 300), 200, (200, 150)),
        ((300, 400), 200, (150, 200)),
        ((1000, 1), 10, (10, 1)),
        ((3, 5), 7, (4, 7)),
    ],
)
def test_resize_long_side(size_in: tuple[int, int], long_side: int, size_out: tuple[int, int]) -> None:
    assert resize_long_side(Image.new("RGB", size_in), long_side).size == size_out


def test_resize_long_side_unchanged_when_already_that_size() -> None:
    img = Image.new("RGB", (64, 32), (1, 2, 3))
    out = resize_long_side(img, 64)
    assert out.size == (64, 32) and out.tobytes() == img.tobytes()


def test_resize_to() -> None:
    assert resize_to(Image.new("RGB", (10, 20)), (33, 7)).size == (33, 7)


def test_check_min_size() -> None:
    check_min_size(Image.new("RGB", (64, 32)), 32, "VGG")
    check_min_size((32, 64), 32, "VGG")
    with pytest.raises(ImageError) as exc:
        check_min_size(Image.new("RGB", (64, 31)), 32, "the style image")
    assert str(exc.value) == (
        "the image is 64×31 px; the smallest side must be at least 32 px for the style image"
    )
    with pytest.raises(ImageError, match="10×40"):
        check_min_size((10, 40), 16, "x")


# --- saving -------------------------------------------------------------------------------------


def test_save_png_round_trip_with_metadata(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    meta = {"nstlab:seed": "42", "Comment": "café ☕"}
    out = save_image(Image.fromarray(arr), tmp_path / "sub" / "dir" / "o.png", metadata=meta)
    assert out == tmp_path / "sub" / "dir" / "o.png"
    with Image.open(out) as saved:
        np.testing.assert_array_equal(np.asarray(saved), arr)
        assert saved.text == meta
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.png"]  # no temp file left


def test_save_tensor_and_no_extension_defaults_to_png(tmp_path: Path) -> None:
    t = torch.rand(1, 3, 5, 6)
    out = save_image(t, tmp_path / "result")
    assert out == tmp_path / "result.png"
    np.testing.assert_array_equal(np.asarray(_open(out)), np.asarray(to_pil(t)))


@pytest.mark.parametrize(
    ("ext", "fmt"), [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".tiff", "TIFF")]
)
def test_save_other_formats(tmp_path: Path, ext: str, fmt: str) -> None:
    arr = np.full((8, 8, 3), (10, 120, 250), np.uint8)
    out = save_image(Image.fromarray(arr), tmp_path / f"o{ext}")
    with Image.open(out) as saved:
        assert saved.format == fmt
        tolerance = 3 if fmt == "JPEG" else 0  # webp and tiff are lossless
        assert np.abs(np.asarray(saved.convert("RGB"), dtype=int) - arr).max() <= tolerance
    assert [p.name for p in tmp_path.iterdir()] == [f"o{ext}"]


def test_save_rgba_as_jpeg(tmp_path: Path) -> None:
    out = save_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "o.jpg")
    assert min(_px(_open(out))) > 250


def test_save_overwrites_existing(tmp_path: Path) -> None:
    save_image(Image.new("RGB", (2, 2), (0, 0, 0)), tmp_path / "o.png")
    save_image(Image.new("RGB", (3, 3), (9, 9, 9)), tmp_path / "o.png")
    assert _open(tmp_path / "o.png").size == (3, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_save_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"\.bmp.*\.png") as exc:
        save_image(Image.new("RGB", (2, 2)), tmp_path / "new" / "o.bmp")
    _assert_error(exc, tmp_path / "new" / "o.bmp")
    assert not list(tmp_path.iterdir())  # not even the parent directory


def test_save_onto_directory(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ImageError, match="directory"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "d.png")
    assert [p.name for p in tmp_path.iterdir()] == ["d.png"]


class _ExplodingImage(Image.Image):
    """An image whose save() writes some bytes and then fails, like a crash mid-encode."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self._exc = exc

    def save(self, fp: object, *args: object, **kwargs: object) -> None:
        assert hasattr(fp, "write")
        fp.write(b"partial data")
        raise self._exc


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        save_image(_ExplodingImage(exc), tmp_path / "o.png")
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_previous_file(tmp_path: Path) -> None:
    save_image(Image.new("RGB", (2, 2), (5, 5, 5)), tmp_path / "o.png")
    before = (tmp_path / "o.png").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_image(_ExplodingImage(KeyboardInterrupt()), tmp_path / "o.png")
    assert (tmp_path / "o.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_failed_replace_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError("simulated rename failure")

    monkeypatch.setattr(images.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "o.png")
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(tmp_path / "o.json", "{}")
    assert not list(tmp_path.iterdir())


def test_saved_file_has_normal_permissions(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    umask = os.umask(0o022)
    try:
        out = save_image(Image.new("RGB", (2, 2)), tmp_path / "o.png")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644


def test_write_text_atomic(tmp_path: Path) -> None:
    out = write_text_atomic(tmp_path / "a" / "meta.json", '{"é": 1}\n')
    assert out == tmp_path / "a" / "meta.json"
    assert out.read_bytes() == '{"é": 1}\n'.encode()
    write_text_atomic(out, "2")
    assert out.read_text() == "2"
    assert [p.name for p in out.parent.iterdir()] == ["meta.json"]


def test_file_sha256(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(tmp_path / "x") == expected
    (tmp_path / "big").write_bytes(b"\x01" * (3 << 20))  # several chunks
    assert file_sha256(str(tmp_path / "big")) == hashlib.sha256(b"\x01" * (3 << 20)).hexdigest()
