"""Folder reference maker: precomputed references (e.g. made elsewhere with another implementation) in a
directory, matched to a content/style pair by file name.

Accepted names (extensions .png, .jpg, .jpeg, in any letter case):

1. ``{pair_name}.{ext}`` — when a pair name is given, e.g. ``pair-1.png`` for the pair "pair-1" of
   ``pairs.csv``;
2. ``{content_stem}__{style_stem}.{ext}`` — two underscores between the file stems of the content and style
   inputs, e.g. ``tubingen__starry_night.jpg``.

Exactly one file must match: none is an error listing the names tried, and two or more (say ``pair-1.png``
and ``pair-1.jpg``, or a pair-name file and a stem file) is an ambiguity error, never a silent choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import ConfigError, ImageError
from nstlab.images import load_image
from nstlab.reference.base import cached_file_sha256

__all__ = ["EXTENSIONS", "candidate_stems", "find_reference", "render"]

EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def candidate_stems(
    pair_name: str | None, content_stem: str | None, style_stem: str | None
) -> list[tuple[str, str]]:
    """[(stem, pattern)] to look for, in order of preference."""
    stems: list[tuple[str, str]] = []
    if pair_name:
        stems.append((pair_name, "{pair}"))
    if content_stem and style_stem:
        stems.append((f"{content_stem}__{style_stem}", "{content_stem}__{style_stem}"))
    return stems


def find_reference(
    reference_dir: Path,
    *,
    pair_name: str | None = None,
    content_stem: str | None = None,
    style_stem: str | None = None,
) -> tuple[Path, str, list[str]]:
    """(file, pattern matched, names tried); one-line ImageError when none or several files match."""
    if pair_name is not None and (not pair_name.strip() or "/" in pair_name or "\\" in pair_name):
        raise ConfigError(f"pair name {pair_name!r} cannot be used as a file name")
    stems = candidate_stems(pair_name, content_stem, style_stem)
    if not stems:
        raise ConfigError(
            "the folder reference needs a pair name (pair_name=...) or content and style given as file paths"
        )
    tried = [stem + ext for stem, _ in stems for ext in EXTENSIONS]
    if not reference_dir.exists():
        raise ImageError(f"reference folder not found: {reference_dir} (looked for {', '.join(tried)})")
    if not reference_dir.is_dir():
        raise ImageError(f"reference folder {reference_dir} is not a directory")
    pattern_of = {stem: pattern for stem, pattern in stems}
    matches = sorted(
        (
            p
            for p in reference_dir.iterdir()
            if p.is_file() and p.suffix.lower() in EXTENSIONS and p.stem in pattern_of
        ),
        key=lambda p: p.name,
    )
    if not matches:
        raise ImageError(f"no reference image in {reference_dir}: tried {', '.join(tried)}")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise ImageError(
            f"ambiguous reference in {reference_dir}: {names} all match; keep exactly one of them"
        )
    return matches[0], pattern_of[matches[0].stem], tried


def render(
    reference_dir: Path | None,
    *,
    pair_name: str | None,
    content_path: Path | None,
    style_path: Path | None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Load the precomputed reference for a pair; (RGB image, maker info incl. the file's sha256)."""
    if reference_dir is None:
        raise ConfigError(
            "the folder reference needs a reference folder (reference_dir / --reference-dir DIR)"
        )
    path, pattern, tried = find_reference(
        reference_dir,
        pair_name=pair_name,
        content_stem=None if content_path is None else content_path.stem,
        style_stem=None if style_path is None else style_path.stem,
    )
    image = load_image(path)
    info: dict[str, Any] = {
        "reference_dir": str(reference_dir),
        "file": str(path),
        "sha256": cached_file_sha256(path),
        "pattern": pattern,
        "tried": tried,
        "output_size": list(image.size),
    }
    return image, info
