"""nstlab: optimisation-based neural style transfer (Gatys et al.) and its ablation studies."""

from __future__ import annotations

__version__ = "0.1.0"

from nstlab.api import InputImage, Result, stylize, stylize_batch  # noqa: E402
from nstlab.config import StylizeConfig  # noqa: E402
from nstlab.engine import Progress  # noqa: E402
from nstlab.errors import (  # noqa: E402
    ConfigError,
    DeviceError,
    ImageError,
    InputError,
    NonFiniteLossError,
    NstlabError,
    StylizeInterrupted,
    WeightsError,
)

__all__ = [
    "ConfigError",
    "DeviceError",
    "ImageError",
    "InputError",
    "InputImage",
    "NonFiniteLossError",
    "NstlabError",
    "Progress",
    "Result",
    "StylizeConfig",
    "StylizeInterrupted",
    "WeightsError",
    "__version__",
    "stylize",
    "stylize_batch",
]
