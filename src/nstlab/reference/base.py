"""Shared pieces of the reference makers: options, the result record, input loading and hashing.

A *reference* is the output of a pretrained arbitrary-style network (AdaIN, Magenta) on the same
content/style pair as an optimised (Gatys et al.) stylisation, or a precomputed image from a folder. It is
a pseudo ground truth for scoring, so every :class:`Reference` carries an ``info`` record that says exactly
which network, weights, settings and inputs produced it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import ConfigError, ImageError
from nstlab.images import file_sha256, load_image

__all__ = [
    "MIN_SIZE",
    "ImageSource",
    "LoadedInput",
    "Reference",
    "ReferenceOptions",
    "cached_file_sha256",
    "load_input",
]

ImageSource = str | os.PathLike[str] | Image.Image

# AdaIN's encoder pools three times (1/8 scale) and then reflect-pads by 1 before each conv of block 4;
# ReflectionPad2d needs the padded side to be >= 2 px, so 16 px is the smallest shorter side that runs.
MIN_SIZE = 16


@dataclass(frozen=True)
class ReferenceOptions:
    """Settings of the reference makers.

    ``alpha`` is the content/style trade-off in [0, 1]: AdaIN mixes features, t = alpha·AdaIN(fc, fs) +
    (1 − alpha)·fc (Huang & Belongie 2017, Eq. 14); Magenta mixes style embeddings, alpha·S(style) +
    (1 − alpha)·S(content) (Magenta's content blending; Ghiasi et al. 2017). ``content_size`` and
    ``style_size`` are the *shorter* side the inputs are resized to before AdaIN's encoder
    (``transforms.Resize(size)`` in the official test.py; Magenta's sizes are fixed by its graphs).
    ``adain_weights`` is a directory holding
    ``vgg_normalised.pth`` and ``decoder.pth`` (offline use); ``reference_dir`` is the folder of the
    ``folder`` maker; ``device`` is the torch device of AdaIN (Magenta always runs on the CPU).
    """

    alpha: float = 1.0
    content_size: int = 512
    style_size: int = 512
    adain_weights: Path | None = None
    reference_dir: Path | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise ConfigError(f"reference alpha must be a number in [0, 1], got {alpha!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"reference alpha must be in [0, 1] (1 = full style, 0 = content only), got {alpha}"
            )
        object.__setattr__(self, "alpha", float(alpha))
        for name in ("content_size", "style_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"reference {name} must be an integer (pixels), got {value!r}")
            if value < MIN_SIZE:
                raise ConfigError(
                    f"reference {name} must be at least {MIN_SIZE} px (AdaIN's encoder works at 1/8 scale),"
                    f" got {value}"
                )
        for name in ("adain_weights", "reference_dir"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str | os.PathLike):
                    raise ConfigError(f"reference {name} must be a directory path, got {value!r}")
                object.__setattr__(self, name, Path(value).expanduser())
        if not isinstance(self.device, str) or not self.device.strip():
            raise ConfigError(f"reference device must be a device name such as 'cpu', got {self.device!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "content_size": self.content_size,
            "style_size": self.style_size,
            "adain_weights": None if self.adain_weights is None else str(self.adain_weights),
            "reference_dir": None if self.reference_dir is None else str(self.reference_dir),
            "device": self.device,
        }


@dataclass
class Reference:
    """A reference (pseudo ground-truth) image and the record of how it was made.

    ``maker`` is the maker actually used ("adain", "magenta" or "folder", never "auto"); ``info`` is
    JSON-serialisable and always holds ``maker``, ``label`` (one line for reports), ``inputs`` (sources and
    sha256), ``cached`` and the maker's own settings, weights files with sha256, and library versions.
    """

    image: Image.Image
    maker: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.info.get("label", self.maker))


@dataclass(frozen=True)
class LoadedInput:
    """An input image loaded as RGB, with its source (path or "<PIL image>") and a content hash."""

    image: Image.Image
    source: str
    sha256: str
    path: Path | None

    def record(self) -> dict[str, Any]:
        # "file" hashes the bytes on disk; "pixels" hashes mode, size and raw RGB bytes of an in-memory image.
        return {
            "source": self.source,
            "sha256": self.sha256,
            "hash_of": "file" if self.path is not None else "pixels",
            "size": list(self.image.size),
        }


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """file_sha256, memoised on (resolved path, size, mtime) so large weights are hashed once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _HASH_MEMO.get(key)
    if digest is None:
        digest = file_sha256(path)
        _HASH_MEMO[key] = digest
    return digest


def _pixels_sha256(img: Image.Image) -> str:
    digest = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def load_input(value: ImageSource, what: str) -> LoadedInput:
    """Load a content/style input (path or PIL image) as RGB and hash it; ImageError if unusable."""
    if isinstance(value, Image.Image):
        rgb = value if value.mode == "RGB" else value.convert("RGB")
        if rgb.width < 1 or rgb.height < 1:
            raise ImageError(f"the {what} image is empty ({rgb.width}×{rgb.height})")
        return LoadedInput(rgb.copy(), "<PIL image>", _pixels_sha256(rgb), None)
    if not isinstance(value, str | os.PathLike):
        raise ImageError(f"the {what} image must be a file path or a PIL image, got {type(value).__name__}")
    path = Path(value)
    img = load_image(path)  # ImageError for missing / unreadable files, naming the path
    return LoadedInput(img, str(path), file_sha256(path), path)
