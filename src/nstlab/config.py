"""Typed configuration. The dataclass defaults are the single source of truth (the CLI reads them).

Defaults are the report's best setting: ResNet-18, L-BFGS, content initialisation, content + style + TV
losses, 1000 iterations, lambda_content = 1, lambda_style = 1e6.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from nstlab.errors import ConfigError, choice_error
from nstlab.features import EXTRACTORS, get_spec
from nstlab.optim import LBFGS_IMPLEMENTATIONS

OPTIMIZERS = ("lbfgs", "adam", "adamw")
# The report's learning rates: Adam 1e-1 and AdamW 1e-2 were the best of its search on pair-2; L-BFGS
# uses torch's default step length 1 (the report does not state it).
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.1, "adamw": 0.01}
INITS = ("content", "noise", "style")
LOSS_TERMS = ("content", "style", "tv")
# Precision of the extractor's convolutions (autocast); Gram matrices, losses, the image and the optimiser
# state always stay fp32. "auto" means fp32 until a parity benchmark shows bf16 equivalent (see engine).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Activation checkpointing: recompute activations in backward instead of keeping them (same result up to
# float rounding, ~1.5x the time, a fraction of the memory). "auto" turns it on above 2048 x 2048 pixels.
CHECKPOINT_MODES = ("auto", "on", "off")
# lambda_tv is not given by the report (it only says TV was added). 1e2 on our TV definition (mean of squared
# neighbour differences, see losses.tv_loss) makes TV a light smoothness prior next to lambda_style = 1e6
# with size-normalised Gram matrices; it is a documented choice, overridable with --tv-weight.
DEFAULT_TV_WEIGHT = 1e2


@dataclass(frozen=True)
class StylizeConfig:
    """Every switch of one stylisation. ``None`` in a field means "the extractor's/optimiser's default"."""

    extractor: str = "resnet18"
    content_layers: tuple[str, ...] | None = None
    style_layers: tuple[str, ...] | None = None
    style_layer_weights: tuple[float, ...] | None = None  # one per style layer; default 1 each (summed)
    weights: str = "torchvision"  # "torchvision" | "random" | path to a state dict
    optimizer: str = "lbfgs"
    lr: float | None = None
    iterations: int = 1000  # objective evaluations (forward + backward), the same budget for every optimiser
    init: str = "content"
    losses: tuple[str, ...] = ("content", "style", "tv")
    content_weight: float = 1.0
    style_weight: float = 1e6
    tv_weight: float = DEFAULT_TV_WEIGHT
    size: int = (
        512  # long side of the content image in pixels; the style image is scaled to the same long side
    )
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16": the extractor's compute precision
    # Coarse-to-fine: optimise first at these fractions of ``size`` (ascending, ending at 1.0), each coarse
    # scale for its ``scale_iterations`` evaluations, upsampling the result as the next scale's start;
    # ``iterations`` are then spent at full size. The default (1.0,) is the report's single-scale method.
    scales: tuple[float, ...] = (1.0,)
    scale_iterations: tuple[int, ...] = ()
    checkpoint: str = "auto"  # "auto" | "on" | "off": activation checkpointing (see CHECKPOINT_MODES)
    # L-BFGS keeps this many curvature pairs, each two image-sized vectors: 100 (torch's default) costs
    # 2 * 100 * 4 bytes per pixel and channel, ~30 GiB at 4096 x 3072; lower it for very large images.
    lbfgs_history: int = 100
    # How L-BFGS computes its search direction: "compact" (nstlab.lbfgs, the default) or "torch"
    # (torch.optim.LBFGS's two-loop recursion). The same algorithm: equal iterates in float64 (tested);
    # in float32 the rounding differs and L-BFGS amplifies it, so runs part visibly (pixels, final loss
    # within a few %) like runs on two kernels. Compact's direction takes 0.66x the time of torch's, saving
    # 5-8 % of an L-BFGS run (benchmarks/README.md). "torch" reproduces runs made before nstlab had its own.
    lbfgs_impl: str = "compact"
    # torch.compile the extractor: opt-in, it costs tens of seconds of compilation up front and pays off
    # only on long runs (benchmarks/README.md). Results equal eager mode up to float rounding.
    compile: bool = False
    # CUDA only: cuDNN picks the fastest convolution algorithms by benchmarking them (cudnn.benchmark),
    # which may differ from run to run; deterministic=True turns that off and asks for deterministic
    # kernels, so that the same seed on the same GPU gives the same pixels. CPU runs are deterministic.
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("losses", "content_layers", "style_layers", "style_layer_weights", "scales"):
            if isinstance(getattr(self, name), str):  # a string would be read one character at a time
                raise ConfigError(
                    f"{name} must be a list (e.g. {name}=(...,)), got the string {getattr(self, name)!r}"
                )
        spec = get_spec(self.extractor)
        if self.optimizer not in OPTIMIZERS:
            raise choice_error("optimizer", self.optimizer, OPTIMIZERS)
        if self.init not in INITS:
            raise choice_error("init", self.init, INITS)
        if not self.losses:
            raise ConfigError(f"losses must name at least one of {', '.join(LOSS_TERMS)}")
        for term in self.losses:
            if term not in LOSS_TERMS:
                raise choice_error("loss term", term, LOSS_TERMS)
        if len(set(self.losses)) != len(self.losses):
            raise ConfigError(f"losses lists a term twice: {','.join(self.losses)}")
        for name in ("content_layers", "style_layers"):
            layers = getattr(self, name)
            if layers is not None:
                if not layers:
                    raise ConfigError(f"{name} must not be empty")
                if len(set(layers)) != len(layers):
                    raise ConfigError(f"{name} lists a layer twice: {','.join(layers)}")
                spec.check_layers(layers)
        style_layers = self.style_layers or spec.style_layers
        if self.style_layer_weights is not None:
            if len(self.style_layer_weights) != len(style_layers):
                raise ConfigError(
                    f"style_layer_weights has {len(self.style_layer_weights)} values but there are "
                    f"{len(style_layers)} style layers ({', '.join(style_layers)})"
                )
            _check_number("style_layer_weights", self.style_layer_weights, minimum=0.0)
        if self.lr is not None:
            _check_number("lr", (self.lr,), minimum=0.0, strict=True)
        for name in ("content_weight", "style_weight", "tv_weight"):
            _check_number(name, (getattr(self, name),), minimum=0.0)
        _check_int("iterations", self.iterations, 1)
        _check_int("size", self.size, 1)
        _check_int("seed", self.seed, 0, maximum=2**63 - 1)  # torch's generators take a signed 64-bit seed
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError("weights must be 'torchvision', 'random' or a path to a state dict file")
        if (
            not self.scales
            or self.scales[-1] != 1.0
            or any(not (0 < a < b) for a, b in zip(self.scales, self.scales[1:], strict=False))
            or not all(isinstance(v, int | float) and 0 < v <= 1 for v in self.scales)
        ):
            raise ConfigError(
                f"scales must be ascending fractions in (0, 1] ending with 1.0, got {self.scales}"
            )
        if len(self.scale_iterations) != len(self.scales) - 1:
            raise ConfigError(
                f"scale_iterations needs one budget per coarse scale ({len(self.scales) - 1}), "
                f"got {len(self.scale_iterations)}"
            )
        for n in self.scale_iterations:
            _check_int("scale_iterations", n, 1)
        if self.checkpoint not in CHECKPOINT_MODES:
            raise choice_error("checkpoint", self.checkpoint, CHECKPOINT_MODES)
        _check_int("lbfgs_history", self.lbfgs_history, 1)
        if self.lbfgs_impl not in LBFGS_IMPLEMENTATIONS:
            raise choice_error("lbfgs_impl", self.lbfgs_impl, LBFGS_IMPLEMENTATIONS)
        for name in ("compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise choice_error("precision", self.precision, PRECISIONS)
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise choice_error("device", self.device, ["auto", "cpu", "cuda", "cuda:N", "mps"])

    # -- derived values -------------------------------------------------------------------------------

    def resolved(self) -> StylizeConfig:
        """The same config with every ``None`` replaced by the value it stands for (what records store)."""
        spec = get_spec(self.extractor)
        style_layers = self.style_layers or spec.style_layers
        return dataclasses.replace(
            self,
            content_layers=self.content_layers or spec.content_layers,
            style_layers=style_layers,
            style_layer_weights=self.style_layer_weights or tuple(1.0 for _ in style_layers),
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in _fields()}

    def __new__(cls, *args: Any, **kwargs: Any) -> StylizeConfig:
        # StylizeConfig(extracter="vgg19") would otherwise be the dataclass's bare TypeError; the API's
        # users get the same ConfigError and "did you mean" as a TOML file or a mapping.
        _check_field_names(kwargs)
        return super().__new__(cls)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StylizeConfig:
        """Build from a plain mapping (TOML, JSON); unknown keys fail with a "did you mean"."""
        _check_field_names(data)
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def replace(self, **changes: Any) -> StylizeConfig:
        return StylizeConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> StylizeConfig:
        """A named preset (see PRESETS) with optional further changes."""
        if name not in PRESETS:
            raise choice_error("preset", name, list(PRESETS))
        return cls.from_dict({**PRESETS[name], **changes})


# Named presets. "report" is the default setting; "coarse-to-fine" spends 300 evaluations at 1/4 and 200 at
# 1/2 of the size before 300 at full size: ~0.37x the pixel-evaluations of 1000 full-size ones. Measured
# (benchmarks/README.md, ResNet-18 at 256 px, random weights) it is *not* faster to a given loss than the
# default there, and settles slightly higher; it is kept as a named option for large images, unmeasured.
PRESETS: dict[str, dict[str, Any]] = {
    "report": {},
    "coarse-to-fine": {"scales": (0.25, 0.5, 1.0), "scale_iterations": (300, 200), "iterations": 300},
}


def _fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(StylizeConfig)


def _check_field_names(data: Mapping[str, Any]) -> None:
    names = [f.name for f in _fields()]
    for key in data:
        if key not in names:
            close = get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config field {key!r}; valid fields: {', '.join(names)}.{hint}")


def _check_number(name: str, values: Sequence[Any], minimum: float, strict: bool = False) -> None:
    for v in values:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < minimum or (strict and v == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise ConfigError(f"{name} must be a finite number {bound}, got {v!r}")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be an integer <= {maximum}, got {value!r}")


__all__ = [
    "DEFAULT_LR",
    "LBFGS_IMPLEMENTATIONS",
    "DEFAULT_TV_WEIGHT",
    "EXTRACTORS",
    "INITS",
    "LOSS_TERMS",
    "OPTIMIZERS",
    "StylizeConfig",
]
