"""The Python API: ``nstlab.stylize(content, style, config) -> Result``.

This layer owns what the engine must not: loading and resizing images, choosing the device, building (and
caching) extractors, and writing outputs with their run records.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from nstlab import images
from nstlab.config import StylizeConfig
from nstlab.engine import EngineResult, Progress, check_compile, optimize, resolve_checkpoint
from nstlab.errors import (
    ConfigError,
    DeviceError,
    ImageError,
    NonFiniteLossError,
    NstlabError,
    ResourceError,
    StylizeInterrupted,
)
from nstlab.features import FeatureExtractor, build_extractor, get_spec
from nstlab.memory import lbfgs_state_bytes, peak_bytes, reset_peak, total_bytes

ImageInput = str | os.PathLike[str] | Image.Image
RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this image was made with an untrained, randomly initialised feature extractor. "
    "It is a smoke-test output, not a style transfer result."
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
        index_text = name.split(":", 1)[1] if ":" in name else "0"
        if name.split(":", 1)[0] != "cuda" or not index_text.isdigit():
            raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' requested but MPS is not available here; use --device cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.lru_cache(maxsize=4)
def _cached_extractor(name: str, layers: tuple[str, ...], weights: str, device: str) -> FeatureExtractor:
    return build_extractor(get_spec(name), layers, weights).to(device)


def get_extractor(cfg: StylizeConfig, device: torch.device) -> FeatureExtractor:
    """The cached frozen extractor for ``cfg``, shared by runs with the same extractor, layers, weights."""
    cfg = cfg.resolved()
    assert cfg.content_layers is not None and cfg.style_layers is not None
    layers = tuple(dict.fromkeys(cfg.content_layers + cfg.style_layers))
    return _cached_extractor(cfg.extractor, layers, cfg.weights, str(device))


def versions() -> dict[str, str]:
    import numpy
    import PIL
    import torchvision

    from nstlab import __version__

    out = {
        "nstlab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name()
    return out


@dataclass
class InputImage:
    """An input image, loaded as RGB, with where it came from (for the record)."""

    image: Image.Image
    source: str
    sha256: str
    original_size: tuple[int, int]

    @classmethod
    def load(cls, value: ImageInput | InputImage, what: str) -> InputImage:
        if isinstance(value, InputImage):
            return value
        if isinstance(value, Image.Image):
            rgb = value.convert("RGB")
            return cls(rgb, f"<in-memory {what} image>", hashlib.sha256(rgb.tobytes()).hexdigest(), rgb.size)
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{what} must be a path or a PIL image, got {type(value).__name__}")
        img = images.load_image(value)
        return cls(img, str(Path(value)), images.file_sha256(value), img.size)

    def record(self, used: tuple[int, int]) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "original_size": list(self.original_size),
            "used_size": list(used),
        }


@dataclass
class Result:
    """A finished (or stopped) stylisation: the image, what produced it, and how it went."""

    image: Tensor  # (1, 3, H, W) float32 in [0, 1], CPU
    config: StylizeConfig  # resolved
    engine: EngineResult
    record: dict[str, Any] = field(repr=False)

    @property
    def random_weights(self) -> bool:
        return bool(self.record["weights"]["random"])

    @property
    def trace(self) -> list[dict[str, float]]:
        return self.engine.trace

    def to_pil(self) -> Image.Image:
        return images.to_pil(self.image)

    def save(self, path: str | os.PathLike[str], *, record: bool = True) -> Path:
        """Write the image (atomically) and, beside it, the JSON run record. Returns the image path."""
        path = Path(path)
        if path.is_dir():
            raise ImageError(f"output {path} is a directory; give a file name such as {path / 'result.png'}")
        if not path.suffix:
            path = path.with_name(path.name + ".png")  # what save_image writes; the record must match
        images.check_not_an_input(path, (Path(v["source"]) for v in self.record["inputs"].values()))
        if record:
            check_sidecar_free(path)
        meta = {
            "nstlab:config": json.dumps(self.record["config"], sort_keys=True),
            "nstlab:weights": self.record["weights"]["source"],
        }
        if self.random_weights:
            meta["nstlab:warning"] = RANDOM_WEIGHTS_WARNING
        images.save_image(self.image, path, metadata=meta)
        if record:
            write_record(self.record | {"output": str(path)}, sidecar_path(path))
        return path


def sidecar_path(image_path: str | os.PathLike[str]) -> Path:
    return Path(image_path).with_suffix(".json")


def sidecar_owner(record_path: Path) -> str | None:
    """The file name of the image that the JSON record at ``record_path`` describes, if it is readable
    and names one (a run record's ``output``, a reference record's ``image``)."""
    try:
        data = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    named = data.get("output", data.get("image"))
    return Path(named).name if isinstance(named, str) and named else None


def check_sidecar_free(image_path: str | os.PathLike[str]) -> None:
    """Refuse an output whose JSON record would replace the record of *another* image that still exists
    (``-o out.jpg`` after ``-o out.png``: both records are ``out.json``). Replacing it would leave
    out.png without the record that says how it was made, or let ``nstlab evaluate out.png`` read
    out.jpg's. Rewriting the same output (a rerun) is fine."""
    image = Path(image_path)
    record = sidecar_path(image)
    owner = sidecar_owner(record)
    if owner is None or owner == image.name or not (image.parent / owner).exists():
        return
    raise ImageError(
        f"{record} is the record of {image.parent / owner}; writing {image} would replace it: give another "
        f"name (e.g. {image.with_name(image.stem + '_' + image.suffix.lstrip('.') + image.suffix)}) "
        f"or remove {image.parent / owner} first"
    )


def write_record(record: dict[str, Any], path: Path) -> None:
    images.write_text_atomic(path, json.dumps(record, indent=1, sort_keys=False) + "\n")


def prepare_inputs(
    content: ImageInput | InputImage, style: ImageInput | InputImage, cfg: StylizeConfig
) -> tuple[InputImage, InputImage, Image.Image, Image.Image]:
    """Load both images and resize: content to ``cfg.size`` on its long side, style to the same long side."""
    cin, sin = InputImage.load(content, "content"), InputImage.load(style, "style")
    spec = get_spec(cfg.extractor)
    resolved = cfg.resolved()
    assert resolved.content_layers is not None and resolved.style_layers is not None
    layers = resolved.content_layers + resolved.style_layers
    minimum = spec.min_side(layers)
    what = f"{spec.display} (layer {max(layers, key=spec.strides)})"
    c = images.resize_long_side(cin.image, cfg.size)
    images.check_min_size(c, minimum, f"the content image at --size {cfg.size} with {what}")
    s = images.resize_long_side(sin.image, max(c.size))
    images.check_min_size(s, minimum, f"the style image at --size {cfg.size} with {what}")
    return cin, sin, c, s


def _setup(
    content: ImageInput | InputImage,
    style: ImageInput | InputImage,
    config: StylizeConfig | Mapping[str, Any] | None,
    overrides: dict[str, Any],
) -> tuple[
    StylizeConfig, torch.device, tuple[InputImage, InputImage, Image.Image, Image.Image], FeatureExtractor
]:
    """Config with overrides, device, loaded and resized inputs, and the (cached) extractor."""
    if isinstance(config, Mapping):  # e.g. a table read from TOML or JSON
        config = StylizeConfig.from_dict(config)
    elif config is not None and not isinstance(config, StylizeConfig):
        raise ConfigError(
            f"config must be a StylizeConfig or a mapping of its fields, got {type(config).__name__}"
        )
    cfg = config or StylizeConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    device = resolve_device(cfg.device)
    inputs = prepare_inputs(content, style, cfg)
    check_optimizer_memory(cfg, device, inputs[2].size)
    # Checked here, before any coarse scale runs (the engine checks again for direct callers).
    check_compile(cfg, inputs[2].size[0] * inputs[2].size[1])
    return cfg, device, inputs, get_extractor(cfg, device)


# The largest share of the device's memory that L-BFGS's state may take before a run is refused up front:
# the rest is for the network's activations, the images and the runtime.
OPTIMIZER_MEMORY_SHARE = 0.8


def check_optimizer_memory(cfg: StylizeConfig, device: torch.device, size: tuple[int, int]) -> None:
    """Refuse up front (ResourceError) a run whose L-BFGS state alone would take most of the device's
    memory: at 4096 x 3072 px the default 100 curvature pairs are ~30 GiB, and running out of memory part
    way through kills the process without a word."""
    if cfg.optimizer != "lbfgs":
        return
    pixels = size[0] * size[1]
    need = lbfgs_state_bytes(pixels, cfg.lbfgs_history, cfg.iterations)
    total = total_bytes(device)
    if total is None or need <= OPTIMIZER_MEMORY_SHARE * total:
        return
    vector = 3 * pixels * 4
    fits = max(1, int((0.25 * total / vector - 5) // 2))  # a history whose state is <= 1/4 of the memory
    raise ResourceError(
        f"L-BFGS with --lbfgs-history {cfg.lbfgs_history} keeps {need / 2**30:.1f} GiB of curvature pairs "
        f"at {size[0]}x{size[1]} px, more than this {device.type} device's {total / 2**30:.0f} GiB allows; "
        f"pass --lbfgs-history {fits} ({lbfgs_state_bytes(pixels, fits, cfg.iterations) / 2**30:.1f} GiB), "
        "a smaller --size, or --optimizer adam"
    )


def _check_batch_optimizer_memory(
    configs: Sequence[StylizeConfig], device: torch.device, size: tuple[int, int]
) -> None:
    """A batch's L-BFGS members keep their curvature pairs side by side: refuse (ResourceError) a batch
    whose members' states together would take most of the device's memory, as check_optimizer_memory does
    for one run."""
    pixels = size[0] * size[1]
    states = [
        lbfgs_state_bytes(pixels, c.lbfgs_history, c.iterations)
        for c in (c.resolved() for c in configs)
        if c.optimizer == "lbfgs"
    ]
    total = total_bytes(device)
    if len(states) < 2 or total is None or sum(states) <= OPTIMIZER_MEMORY_SHARE * total:
        return
    raise ResourceError(
        f"the batch's {len(states)} L-BFGS members keep {sum(states) / 2**30:.1f} GiB of curvature pairs "
        f"together at {size[0]}x{size[1]} px, more than this {device.type} device's {total / 2**30:.0f} GiB "
        "allows; batch fewer settings (a smaller --batch) or pass a smaller --lbfgs-history"
    )


def stylize(
    content: ImageInput | InputImage,
    style: ImageInput | InputImage,
    config: StylizeConfig | Mapping[str, Any] | None = None,
    *,
    on_step: Callable[[Progress], None] | None = None,
    snapshot_at: Collection[int] = (),
    **overrides: Any,
) -> Result:
    """Stylise ``content`` with ``style``. ``config`` (a StylizeConfig, or a mapping of its fields)
    defaults to the report's best setting; keyword
    ``overrides`` replace single fields (``stylize(c, s, iterations=200, weights="random")``).

    Raises an :class:`~nstlab.errors.InputError` subclass for bad images, options, devices or weights,
    :class:`~nstlab.errors.NonFiniteLossError` when the loss breaks down and
    :class:`~nstlab.errors.StylizeInterrupted` on Ctrl-C; both carry a partial :class:`Result` in ``.result``.
    """
    cfg, device, (cin, sin, c_img, s_img), extractor = _setup(content, style, config, overrides)
    c = images.to_tensor(c_img).to(device)
    s = images.to_tensor(s_img).to(device)
    reset_peak(device)
    started = _dt.datetime.now(_dt.UTC)

    def _finish(res: EngineResult) -> Result:
        return _make_result(cfg, device, extractor, (cin, sin, c_img, s_img), res, started)

    coarse: list[dict[str, Any]] = []
    backend: dict[str, bool] = {}

    def finish(res: EngineResult) -> Result:
        result = _finish(res)
        result.record["run"].update(backend)
        if coarse:
            result.record["run"]["coarse_scales"] = coarse
            result.record["run"]["total_evaluations"] = res.evaluations + sum(
                x["evaluations"] for x in coarse
            )
        return result

    try:
        with cuda_backend_flags(cfg, device) as flags:
            backend.update(flags)
            init = _coarse_to_fine(extractor, c_img, s_img, cfg, device, coarse)
            res = optimize(extractor, c, s, cfg, on_step=on_step, snapshot_at=snapshot_at, init=init)
    except NonFiniteLossError as exc:
        exc.result = finish(exc.result)
        raise
    except StylizeInterrupted as exc:
        exc.result = finish(exc.result)
        raise
    return finish(res)


def _make_result(
    cfg: StylizeConfig,
    device: torch.device,
    extractor: FeatureExtractor,
    inputs: tuple[InputImage, InputImage, Image.Image, Image.Image],
    res: EngineResult,
    started: _dt.datetime,
) -> Result:
    """The Result of an engine run, with its full run record."""
    cin, sin, c_img, s_img = inputs
    peak, peak_kind = peak_bytes(device)
    resolved = cfg.resolved()
    record: dict[str, Any] = {
        "nstlab_record": 1,
        "random_weights": extractor.weights.random,
        **({"warning": RANDOM_WEIGHTS_WARNING} if extractor.weights.random else {}),
        "config": resolved.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "versions": versions(),
        "weights": extractor.weights.as_dict(),
        "inputs": {"content": cin.record(c_img.size), "style": sin.record(s_img.size)},
        "optimizer": res.optimizer,
        "run": {
            "started": started.isoformat(timespec="seconds"),
            "stop_reason": res.stop_reason,
            "precision": res.precision,
            "checkpoint": res.checkpoint,
            "evaluations": res.evaluations,
            "optimizer_steps": res.steps,
            "wall_time_s": round(res.wall_time_s, 4),
            "seconds_per_evaluation": round(res.wall_time_s / max(res.evaluations, 1), 5),
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
        },
        "final_losses": res.trace[-1] if res.trace else None,
        "trace": res.trace,
    }
    return Result(res.image, resolved, res, record)


def stylize_batch(
    content: ImageInput | InputImage,
    style: ImageInput | InputImage,
    configs: Sequence[StylizeConfig],
    *,
    snapshot_at: Sequence[Collection[int]] | None = None,
    on_step: Callable[[Progress], None] | None = None,
) -> list[Result | NstlabError]:
    """Several settings on one pair in one batched run (see :mod:`nstlab.batch`): the same
    results as separate :func:`stylize` calls up to float rounding (which L-BFGS amplifies over its steps,
    as it amplifies any rounding difference). Returns a Result per config, or the
    error that config's own run raised (a non-finite loss stops only that member; its ``.result`` holds
    the last finite image). Configs must share :func:`nstlab.batch.batch_key`, else ConfigError.
    ``on_step`` gets the batch's evaluations (losses summed over members). A member's record gives the
    time from the batch's start to its end and the batch's peak memory, marked as such."""
    from nstlab.batch import batch_key, optimize_batch

    if not configs:
        return []
    keys = {batch_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise ConfigError(
            "a batch needs configs at one scale, without --compile, that differ only in their optimiser, "
            "learning rate, L-BFGS history, initialisation, seed, iterations or loss terms and weights"
        )
    cfg, device, inputs, extractor = _setup(content, style, configs[0], {})
    for other in configs[1:]:
        check_optimizer_memory(other, device, inputs[2].size)
    _check_batch_optimizer_memory(configs, device, inputs[2].size)
    c = images.to_tensor(inputs[2]).to(device)
    s = images.to_tensor(inputs[3]).to(device)
    reset_peak(device)
    started = _dt.datetime.now(_dt.UTC)
    with cuda_backend_flags(cfg, device) as flags:
        outcomes = optimize_batch(extractor, c, s, configs, snapshot_at=snapshot_at, on_step=on_step)
    # Time and peak memory in a member's record are the batch's (shared): say so next to them.
    batch_info = {"batch_size": len(configs), "time_and_memory": "shared by the batch"}
    results: list[Result | NstlabError] = []
    for member_cfg, out in zip(configs, outcomes, strict=True):
        engine_result = out.result if isinstance(out, NonFiniteLossError) else out
        result = _make_result(member_cfg, device, extractor, inputs, engine_result, started)
        result.record["run"].update(flags, **batch_info)
        if isinstance(out, NonFiniteLossError):
            out.result = result
            results.append(out)
        else:
            results.append(result)
    return results


@contextlib.contextmanager
def cuda_backend_flags(cfg: StylizeConfig, device: torch.device) -> Iterator[dict[str, bool]]:
    """On CUDA: cudnn.benchmark (fastest kernels for the fixed image size), or with ``deterministic``
    deterministic kernels instead; restored afterwards (the flags are process-wide). No-op elsewhere."""
    if device.type != "cuda":
        yield {}
        return
    cudnn = torch.backends.cudnn
    old = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    if cfg.deterministic:
        # cuBLAS needs this to be deterministic; it must be set before its first use in the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn.benchmark, cudnn.deterministic = not cfg.deterministic, cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        yield {"cudnn_benchmark": not cfg.deterministic, "deterministic_algorithms": cfg.deterministic}
    finally:
        cudnn.benchmark, cudnn.deterministic = old[0], old[1]
        torch.use_deterministic_algorithms(old[2])


def _coarse_to_fine(
    extractor: FeatureExtractor,
    content: Image.Image,
    style: Image.Image,
    cfg: StylizeConfig,
    device: torch.device,
    log: list[dict[str, Any]],
) -> Tensor | None:
    """Run the coarse scales (if any); return the upsampled start image for the full-size run."""
    image: Tensor | None = None
    minimum = get_spec(cfg.extractor).min_side(_layers(cfg))
    for scale, budget in zip(cfg.scales[:-1], cfg.scale_iterations, strict=True):
        long_side = max(round(cfg.size * scale), minimum)
        c = images.resize_long_side(content, long_side)
        s = images.resize_long_side(style, long_side)
        if min(c.size) < minimum:
            raise ConfigError(
                f"scale {scale} makes the content {c.size[0]}x{c.size[1]} px, below {minimum} px"
            )
        ct, st = images.to_tensor(c).to(device), images.to_tensor(s).to(device)
        start = None if image is None else _upsample(image.to(device), ct.shape[-2:])
        res = optimize(extractor, ct, st, cfg.replace(iterations=budget), init=start)
        image = res.image
        log.append(
            {
                "scale": scale,
                "size": list(c.size),
                "evaluations": res.evaluations,
                "wall_time_s": round(res.wall_time_s, 4),
                "final_losses": res.trace[-1],
            }
        )
    if image is None:
        return None
    return _upsample(image.to(device), (content.size[1], content.size[0]))


def _upsample(image: Tensor, size: Any) -> Tensor:
    return F.interpolate(image, size=tuple(size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def _layers(cfg: StylizeConfig) -> tuple[str, ...]:
    resolved = cfg.resolved()
    assert resolved.content_layers is not None and resolved.style_layers is not None
    return resolved.content_layers + resolved.style_layers


@dataclass(frozen=True)
class Estimate:
    """Expected cost of a run, extrapolated from two short probe runs at reduced sizes."""

    peak_memory_bytes: int
    seconds_per_evaluation: float
    total_seconds: float
    probes: list[dict[str, float]]
    memory_kind: str
    checkpoint: bool = False

    def describe(self) -> str:
        gib = self.peak_memory_bytes / 2**30
        sizes = ", ".join(str(int(p["long_side"])) for p in self.probes)
        return (
            f"estimate: peak memory ~{gib:.2f} GiB ({self.memory_kind}), "
            f"~{self.seconds_per_evaluation:.3g} s per iteration, ~{self.total_seconds / 60:.1f} min in all "
            f"(extrapolated linearly in pixel count from probes at {sizes} px"
            f"{', activation checkpointing on' if self.checkpoint else ''})"
        )


def estimate(
    content: ImageInput | InputImage,
    style: ImageInput | InputImage,
    config: StylizeConfig | None = None,
    **overrides: Any,
) -> Estimate:
    """Predict peak memory and time of ``stylize`` without running it: two probes (3 evaluations each) at
    1/16 and 1/4 of the target pixel count, whose activation memory and time per evaluation are fitted as
    a + b * pixels and extrapolated. Weights and libraries already resident count once."""
    from nstlab.memory import current_bytes

    cfg, device, (cin, sin, c_img, s_img), extractor = _setup(content, style, config, overrides)
    minimum = get_spec(cfg.extractor).min_side(_layers(cfg))
    target_px = c_img.size[0] * c_img.size[1]
    # The probes run in the memory mode the full-size run will use (checkpointing switches by size).
    mode = "on" if resolve_checkpoint(cfg.checkpoint, target_px) else "off"
    probe_cfg = cfg.replace(iterations=3, scales=(1.0,), scale_iterations=(), checkpoint=mode)
    probes: list[dict[str, float]] = []
    for fraction in (0.25, 0.5):  # of the long side: 1/16 and 1/4 of the pixels
        long_side = max(round(cfg.size * fraction), 2 * minimum)
        c = images.to_tensor(images.resize_long_side(c_img, long_side)).to(device)
        s = images.to_tensor(images.resize_long_side(s_img, long_side)).to(device)
        reset_peak(device)
        before = current_bytes(device)
        res = optimize(extractor, c, s, probe_cfg)
        peak, kind = peak_bytes(device)
        probes.append(
            {
                "long_side": long_side,
                "pixels": c.shape[-1] * c.shape[-2],
                "activation_bytes": max(peak - before, 0),
                "seconds": res.wall_time_s / 3,
                "resident_bytes": before,
            }
        )
    (p1, p2) = probes

    def extrapolate(key: str) -> float:
        slope = (p2[key] - p1[key]) / max(p2["pixels"] - p1["pixels"], 1)
        return max(p2[key] + slope * (target_px - p2["pixels"]), p2[key])

    per_eval = extrapolate("seconds")
    coarse_px = sum(
        target_px * sc * sc * n for sc, n in zip(cfg.scales[:-1], cfg.scale_iterations, strict=True)
    )
    total = per_eval * (cfg.iterations + coarse_px / target_px)
    peak_total = int(p2["resident_bytes"] + extrapolate("activation_bytes"))
    if cfg.optimizer == "lbfgs":
        # During a probe's last (3rd) evaluation L-BFGS holds one curvature pair and its five working
        # vectors; they grew with the pixels like the activations, so the extrapolation already counts them
        # at the target size. The real run holds up to lbfgs_history pairs.
        peak_total += lbfgs_state_bytes(target_px, cfg.lbfgs_history, cfg.iterations) - lbfgs_state_bytes(
            target_px, cfg.lbfgs_history, 1
        )
    del cin, sin
    return Estimate(peak_total, per_eval, total, probes, kind, mode == "on")


__all__ = [
    "Estimate",
    "InputImage",
    "Result",
    "estimate",
    "resolve_device",
    "sidecar_path",
    "check_sidecar_free",
    "stylize",
    "stylize_batch",
    "versions",
]
