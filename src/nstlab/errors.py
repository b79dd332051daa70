"""Typed exceptions. Every user-facing failure is an :class:`NstlabError` with a one-line message.

The CLI maps :class:`InputError` subclasses (bad files, bad options, missing weights) to exit code 2,
other :class:`NstlabError` to exit code 1, and never shows a traceback for either.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any


class NstlabError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class InputError(NstlabError):
    """Bad input from the user (exit code 2 on the CLI)."""


class ConfigError(InputError, ValueError):
    """An option or config field has an invalid value."""


class ImageError(InputError):
    """An input image cannot be used (missing, not an image, truncated, too large or too small)."""


class WeightsError(InputError):
    """Pretrained weights are missing or do not fit the model."""


class DeviceError(InputError):
    """The requested device is not available."""


class ResourceError(InputError):
    """The requested run cannot fit this machine (e.g. the optimiser state alone exceeds its memory)."""


class CompileError(NstlabError):
    """torch.compile could not compile the extractor (no C++ compiler, an unsupported platform...)."""


class NonFiniteLossError(NstlabError):
    """The loss became NaN or infinite; ``result`` holds the last finite image and the trace so far."""

    def __init__(self, message: str, evaluation: int, result: Any = None) -> None:
        super().__init__(message)
        self.evaluation = evaluation
        self.result = result


class StylizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during optimisation; ``result`` holds the image and trace at the moment of the interrupt.

    A subclass of KeyboardInterrupt so that code which does not know about nstlab still stops.
    """

    def __init__(self, result: Any = None) -> None:
        super().__init__("interrupted")
        self.result = result


def choice_error(what: str, value: object, choices: list[str] | tuple[str, ...]) -> ConfigError:
    """A ConfigError naming the valid choices, with a "did you mean" when one is close."""
    valid = ", ".join(choices)
    close = get_close_matches(str(value), list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {what} {value!r}; valid choices: {valid}.{hint}")
