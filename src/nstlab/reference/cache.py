"""On-disk cache of references: ``<cache dir>/<maker>-<key>.png`` + ``.json``.

The key is the sha256 of a canonical JSON of everything that determines the pixels: the maker, the options
that matter to it, the sha256 of the content and style inputs (file bytes, or pixel bytes for in-memory
images), the sha256 of the weights/model files, and a format number bumped when the processing changes.
The PNG is written first and the JSON last, both atomically, so a JSON on disk means a complete entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import NstlabError
from nstlab.images import load_image, save_image, write_text_atomic

__all__ = ["CACHE_FORMAT", "cache_key", "cache_root", "default_cache_dir", "entry_paths", "load", "store"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENV_VAR = "NSTLAB_CACHE"


def cache_root() -> Path:
    """The nstlab cache root: ``$NSTLAB_CACHE`` if set, else ``~/.cache/nstlab``."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nstlab"


def default_cache_dir() -> Path:
    """Where references are cached by default: ``<cache root>/references``."""
    return cache_root() / "references"


def cache_key(payload: dict[str, Any]) -> str:
    canonical = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def entry_paths(cache_dir: Path, maker: str, key: str) -> tuple[Path, Path]:
    stem = f"{maker}-{key}"
    return cache_dir / f"{stem}.png", cache_dir / f"{stem}.json"


def load(cache_dir: Path, maker: str, key: str) -> tuple[Image.Image, dict[str, Any]] | None:
    """The cached (image, info) or None; a damaged entry is logged and treated as a miss."""
    png, meta = entry_paths(cache_dir, maker, key)
    if not (meta.is_file() and png.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or info.get("cache_key") != key:
            raise ValueError("the JSON does not describe this entry")
        image = load_image(png)
    except (OSError, ValueError, NstlabError) as exc:
        log.warning("ignoring damaged reference cache entry %s (%s)", png, " ".join(str(exc).split()))
        return None
    return image, info


def store(cache_dir: Path, maker: str, key: str, image: Image.Image, info: dict[str, Any]) -> Path | None:
    """Write the entry atomically; the PNG path, or None (with a warning) if the cache is not writable."""
    png, meta = entry_paths(cache_dir, maker, key)
    try:
        save_image(image, png)
        write_text_atomic(meta, json.dumps(info, indent=2, sort_keys=True) + "\n")
    except (OSError, NstlabError) as exc:
        log.warning("could not write the reference cache %s (%s)", cache_dir, " ".join(str(exc).split()))
        return None
    return png
