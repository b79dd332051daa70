"""Shared fixtures: tiny real configurations on the CPU, and the shared data set when it is present."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nstlab.config import StylizeConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    # Hermetic caches: references and AdaIN weights go to a fresh folder (inherited by subprocesses),
    # never to the user's ~/.cache/nstlab.
    os.environ["NSTLAB_CACHE"] = tempfile.mkdtemp(prefix="nstlab-test-cache-")
    # Never download (torchvision or AdaIN weights), on any machine, in this process or its children:
    # the tests that exercise a download replace the transfer itself and unset this.
    os.environ["NSTLAB_OFFLINE"] = "1"


def tiny_config(**changes: object) -> StylizeConfig:
    """The report's default setting shrunk for tests: 64 px, a few iterations, CPU, random weights."""
    base: dict[str, object] = {"size": 64, "iterations": 6, "device": "cpu", "weights": "random"}
    return StylizeConfig.from_dict({**base, **changes})


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "pairs.csv").is_file():
        pytest.skip("../shared/data is not present in this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_pairs(shared_data: Path) -> list[tuple[str, Path, Path]]:
    with open(shared_data / "pairs.csv", newline="") as fh:
        return [(r["pair"], shared_data / r["content"], shared_data / r["style"]) for r in csv.DictReader(fh)]


def _smooth_image(seed: int, size: tuple[int, int]) -> Image.Image:
    # Low-frequency colour fields: image-like (structured), unlike white noise.
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.random((4, 4, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return img


def _texture_image(seed: int, size: tuple[int, int]) -> Image.Image:
    # Diagonal colour stripes plus grain: a "style" whose statistics differ from the smooth content.
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 0.5 + 0.5 * np.sin((xx + yy)[..., None] * np.array([0.7, 0.45, 0.2]))
    img = np.clip(0.8 * stripes + 0.2 * rng.random((h, w, 3)), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def write_pair(folder: Path) -> tuple[Path, Path]:
    content, style = folder / "content.png", folder / "style.png"
    _smooth_image(1, (96, 72)).save(content)
    _texture_image(2, (80, 80)).save(style)
    return content, style


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic content/style pair of PNG files (no shared data needed)."""
    return write_pair(tmp_path)
