"""Image I/O: robust loading to 8-bit RGB, tensor conversion, resizing, and atomic saving."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from nstlab.errors import ImageError

__all__ = [
    "MAX_PIXELS",
    "SAVE_FORMATS",
    "check_min_size",
    "check_output_path",
    "file_sha256",
    "load_image",
    "resize_long_side",
    "resize_to",
    "save_image",
    "to_pil",
    "to_tensor",
    "write_text_atomic",
]

MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS, fixed here so nobody else can move it.

SAVE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_HIGH_DEPTH_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _one_line(text: object) -> str:
    # Pillow/OS messages occasionally span lines; the CLI promises one-line errors.
    return " ".join(str(text).split())


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is composited on white. Raises ValueError if impossible."""
    if img.mode in _HIGH_DEPTH_INT_MODES or img.mode == "F":
        # convert("RGB") clips these modes at 255 instead of scaling, which turns a 16-bit photo white.
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        peak = float(a.max()) if a.size else 0.0
        if img.mode == "F":
            # Float images have no standard range: [0, 1] is the usual convention, anything else is 0..255.
            a = a * 255.0 if peak <= 1.0 else a
        elif img.mode != "I" or peak > 255:
            # "I" (32-bit) is also how Pillow returns some 16-bit files; only values > 255 reveal 16-bit.
            a = a / 257.0
        grey = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Transparent regions would otherwise come out as whatever colour hides under alpha 0 (often black).
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Image.Image:
    """Load ``path`` as an 8-bit RGB image with EXIF orientation applied.

    Every failure (missing, directory, empty, not an image, truncated, too many pixels, unconvertible
    colour mode) raises :class:`ImageError` with a one-line message naming the path.
    """
    p = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if not p.exists():
        raise ImageError(f"image not found: {p} (check the path and the current directory)")
    if p.is_dir():
        raise ImageError(f"{p} is a directory, not an image file; pass the path of an image inside it")
    if p.stat().st_size == 0:
        raise ImageError(f"image file {p} is empty (0 bytes); re-export or re-download it")
    too_big = f"image {p} has too many pixels (decompression-bomb guard, limit {limit:,} px)"
    hint = "downscale it first (in Python, load_image(path, max_pixels=...) raises the limit)"
    # Pillow warns inside Image.open against its own global limit (and raises at twice that). Escalate the
    # warning only when our limit is at least as strict, else a raised max_pixels could never take effect.
    pil_limit = Image.MAX_IMAGE_PIXELS
    escalate = pil_limit is None or limit <= pil_limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
            with Image.open(p) as f:
                w, h = f.size
                # Checked before load(), i.e. before Pillow allocates or decodes anything.
                if w * h > limit:
                    raise ImageError(f"{too_big}: it is {w}×{h} = {w * h:,} px; {hint}")
                f.load()
                img = ImageOps.exif_transpose(f)  # always a new, file-independent image
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{p} is not an image Pillow can read; use a PNG, JPEG, WebP or TIFF file") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{too_big}: {_one_line(e)}; {hint}") from e
    except PermissionError as e:
        raise ImageError(f"cannot read image {p}: permission denied") from e
    except MemoryError:
        raise
    except Exception as e:
        # Decoders report damaged data as OSError ("image file is truncated"), SyntaxError, ValueError,
        # struct.error, EOFError, ... depending on the plugin; at this boundary they all mean "bad file".
        raise ImageError(
            f"image file {p} is truncated or corrupt ({type(e).__name__}: {_one_line(e)}); "
            "re-export or re-download it"
        ) from e
    try:
        return _to_rgb(img)
    except ValueError as e:
        raise ImageError(
            f"image {p} has colour mode {img.mode!r}, which cannot be converted to RGB; save it as 8-bit RGB"
        ) from e


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image → float32 tensor of shape (1, 3, H, W) in [0, 1] (non-RGB images go through RGB first)."""
    rgb = _to_rgb(img)
    # np.array (not asarray) gives a writable copy, which torch.from_numpy needs to avoid a warning.
    arr = np.array(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(t: torch.Tensor) -> Image.Image:
    """Tensor of shape (1, 3, H, W) or (3, H, W), nominally in [0, 1] → 8-bit RGB image (clamped, rounded)."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a tensor of shape (1, 3, H, W) or (3, H, W), got {tuple(t.shape)}")
    # NaN would otherwise survive clamp() and become an arbitrary byte.
    x = torch.nan_to_num(t.detach().to("cpu", torch.float32), nan=0.0).clamp(0.0, 1.0)
    arr = x.mul(255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so that the longer side is ``size`` px, keeping the aspect ratio (LANCZOS)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    w, h = img.size
    if max(w, h) == size:
        return img.copy()
    scale = size / max(w, h)
    # Set the long side exactly rather than via rounding, so the contract max(w, h) == size always holds.
    new = (size, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), size)
    return img.resize(new, Image.Resampling.LANCZOS)


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly ``size`` = (width, height) with LANCZOS (the aspect ratio may change)."""
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive, got {size}")
    if img.size == tuple(size):
        return img.copy()
    return img.resize(size, Image.Resampling.LANCZOS)


def check_min_size(img_or_size: Image.Image | tuple[int, int], min_side: int, what: str) -> None:
    """Raise :class:`ImageError` if the smaller side of an image or (width, height) is < ``min_side``."""
    w, h = img_or_size.size if isinstance(img_or_size, Image.Image) else img_or_size
    if min(w, h) < min_side:
        raise ImageError(
            f"the image is {w}×{h} px; the smallest side must be at least {min_side} px for {what}"
        )


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Run ``write`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Readers see either the old file or the complete new one. On any exception, KeyboardInterrupt
    included, the temporary file is removed and the exception re-raised.
    """
    if path.is_dir():
        raise ImageError(f"cannot write {path}: it is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open with mode 0o666 (not mkstemp, which forces 0o600) so the result gets the usual umask-based
    # permissions; O_EXCL guarantees we never clobber someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_image(
    img: Image.Image | torch.Tensor,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Atomically save ``img`` (a PIL image or an image tensor) and return the path written.

    The format follows the extension: .png (also used when there is no extension, which is then
    appended), .jpg/.jpeg (quality 95), .webp (lossless), .tif/.tiff. ``metadata`` goes into PNG tEXt
    chunks and is ignored by the other formats (use a JSON sidecar via :func:`write_text_atomic`).
    """
    p = Path(path)
    if not p.suffix:
        p = p.with_name(p.name + ".png")
    fmt = SAVE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        supported = ", ".join(SAVE_FORMATS)
        raise ImageError(f"cannot save {p}: unsupported extension {p.suffix!r}; use one of {supported}")
    pil = to_pil(img) if isinstance(img, torch.Tensor) else img
    params: dict[str, object] = {}
    if fmt == "PNG" and metadata:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)  # falls back to iTXt for non-Latin-1 values
        params["pnginfo"] = info
    elif fmt == "JPEG":
        # 4:4:4 chroma: the default 4:2:0 subsampling smears the fine colour texture of stylised output.
        params.update(quality=95, subsampling=0)
        if pil.mode not in ("RGB", "L", "CMYK"):
            pil = _to_rgb(pil)  # JPEG cannot store alpha
    elif fmt == "WEBP":
        params["lossless"] = True

    def write(f: IO[bytes]) -> None:
        pil.save(f, format=fmt, **params)

    return _atomic_write(p, write)


def check_output_path(path: Path, example: str = "result.png") -> None:
    """Fail fast (before any long computation) on an output path that save_image would refuse."""
    if path.is_dir():
        raise ImageError(f"output {path} is a directory; give a file name such as {path / example}")
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ImageError(f"output {path} has an unsupported extension; use one of {', '.join(SAVE_FORMATS)}")


def check_not_an_input(output: Path, inputs: Iterable[object]) -> None:
    """Refuse an output path that names one of the input image files (or whose JSON record beside it
    would): writing the result must never destroy what it was made from."""
    for item in inputs:
        if not isinstance(item, str | os.PathLike):
            continue  # an in-memory image has no file to protect
        source = Path(item)
        for written in (output, output.with_suffix(".json")):
            try:
                same = os.path.samefile(written, source)
            except OSError:  # one of them does not exist (yet)
                same = written.resolve() == source.resolve()
            if same:
                raise ImageError(
                    f"output {output} would overwrite the input {source}; give another output name"
                )


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` as UTF-8 (e.g. a JSON sidecar) and return the path."""
    data = text.encode("utf-8")

    def write(f: IO[bytes]) -> None:
        f.write(data)

    return _atomic_write(Path(path), write)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
