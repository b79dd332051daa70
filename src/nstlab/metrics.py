"""Image-quality metrics for scoring stylisations against a reference (e.g. a pseudo ground truth).

All pixel metrics take RGB images in [0, 1] (tensors (1, 3, H, W) / (3, H, W) or PIL images), use
data_range = 1 and are computed in float64:

* ``mse``  = mean over pixels and channels of (x - y)^2;  ``rmse`` = sqrt(mse)
* ``psnr`` = 10 * log10(1 / mse) dB (inf for identical images)
* ``ssim`` = Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, per RGB channel
  over the "valid" region (no padding), then averaged -- via pytorch-msssim; this equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.

``convention="report-compat"`` reproduces the project report's table, whose "RMSE" column holds the MSE
and whose "PSNR" is 20 * log10(1 / MSE); see docs/metrics.md for the evidence and its limits.

Beyond pixels: content/style distances measured by a fixed VGG-19 "judge" (Gatys et al. layers) and
LPIPS (only when its backbone weights are cached; nothing here ever downloads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from nstlab import images
from nstlab.errors import ImageError, InputError, WeightsError, choice_error
from nstlab.features import FeatureExtractor, WeightsInfo, build_extractor, get_spec
from nstlab.losses import gram_matrix

__all__ = [
    "CONVENTIONS",
    "JUDGE_CONTENT_LAYERS",
    "JUDGE_STYLE_LAYERS",
    "LPIPS_MIN_SIDE",
    "LPIPS_NETS",
    "SSIM_WIN_SIZE",
    "TABLE_PSNR",
    "Judge",
    "LpipsWeightsError",
    "aggregate",
    "align_to",
    "as_batch",
    "content_distance",
    "evaluate_pair",
    "format_table",
    "image_metrics",
    "lpips_distance",
    "lpips_weights_path",
    "make_judge",
    "mse",
    "psnr",
    "rmse",
    "ssim",
    "style_distance",
]

ImageLike = Tensor | Image.Image

CONVENTIONS = ("standard", "report-compat")
SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
RANGE_TOLERANCE = 1e-6

# The report's tables average per-image PSNRs (the usual convention). aggregate() also returns the PSNR of
# the mean MSE, which is never larger (Jensen's inequality: -log is convex).
TABLE_PSNR = "mean_of_per_image"

# The judge is fixed, independent of any run's configuration: Gatys et al.'s layers. (The extractor spec's
# default style layers follow the report, which adds relu4_2; a judge must not move with that choice.)
JUDGE_CONTENT_LAYERS = ("relu4_2",)
JUDGE_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

LPIPS_NETS = ("alex", "vgg")
# Smallest input side each LPIPS trunk accepts (AlexNet's 11x11 stride-4 conv and three 3x3 poolings).
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}


# --- inputs --------------------------------------------------------------------------------------------


def _size(x: Tensor) -> str:
    return f"{x.shape[-1]}×{x.shape[-2]}"  # width×height, as images.py prints sizes


def as_batch(x: ImageLike, what: str = "image") -> Tensor:
    """Validate ``x`` and return it as a detached float tensor of shape (1, 3, H, W) in [0, 1].

    PIL images go through :func:`nstlab.images.to_tensor`. Values may stray outside [0, 1] by at most
    1e-6 (float rounding) and are then clamped; anything further out raises :class:`InputError`.
    """
    if isinstance(x, Image.Image):
        return images.to_tensor(x)
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a torch tensor or a PIL image, got {type(x).__name__}")
    t = x.detach()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[0] != 1:
        raise InputError(
            f"{what} has shape {tuple(x.shape)}; expected (1, 3, H, W) or (3, H, W) "
            "(score one image at a time and combine rows with aggregate())"
        )
    if t.shape[1] != 3:
        raise InputError(
            f"{what} has {t.shape[1]} channels; expected 3 (RGB): drop alpha with x[:, :3] "
            "or repeat a grey channel with x.expand(-1, 3, -1, -1)"
        )
    if not t.is_floating_point():
        raise InputError(f"{what} has dtype {t.dtype}; metrics need floats in [0, 1] (use x.float() / 255)")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if t.numel() == 0:
        raise ImageError(f"{what} is empty ({_size(t)} px)")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} contains NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise InputError(
            f"{what} has values in [{lo:.4g}, {hi:.4g}]; the data range must be [0, 1] "
            "(divide 0-255 images by 255, clamp optimiser output with x.clamp(0, 1))"
        )
    return t.clamp(0.0, 1.0)


def align_to(reference: ImageLike, size: tuple[int, int] | ImageLike) -> Tensor:
    """Resize ``reference`` to ``size`` = (width, height), or to the size of the image ``size``, with Lanczos.

    Tensors are resized per channel in float (Pillow mode "F"), so no 8-bit rounding is added; Lanczos
    overshoots at edges, so the result is clamped to [0, 1]. Returns a (1, 3, H, W) float32 tensor.
    """
    if isinstance(size, (Tensor, Image.Image)):
        target = as_batch(size, "size image")
        w, h = int(target.shape[-1]), int(target.shape[-2])
    else:
        w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise InputError(f"cannot align to size {w}×{h}; width and height must be positive")
    if isinstance(reference, Image.Image):
        return images.to_tensor(images.resize_to(reference, (w, h)))
    ref = as_batch(reference, "reference")
    if (ref.shape[-1], ref.shape[-2]) == (w, h):
        return ref.float()
    planes = [
        np.asarray(
            Image.fromarray(c.float().cpu().numpy(), mode="F").resize((w, h), Image.Resampling.LANCZOS)
        )
        for c in ref[0]
    ]
    out = torch.from_numpy(np.stack(planes)).unsqueeze(0).clamp(0.0, 1.0)
    return out.to(ref.device)


def _pair(output: ImageLike, reference: ImageLike, ref_name: str = "reference") -> tuple[Tensor, Tensor]:
    x, y = as_batch(output, "output"), as_batch(reference, ref_name)
    if x.shape != y.shape:
        raise InputError(
            f"output is {_size(x)} px but {ref_name} is {_size(y)} px; resize the {ref_name} to the output's "
            f"size first, e.g. metrics.align_to({ref_name}, ({x.shape[-1]}, {x.shape[-2]})) (Lanczos)"
        )
    # float64: PSNR of near-identical images and agreement with scikit-image need the precision.
    return x.double(), y.to(x.device, torch.float64)


# --- pixel metrics -------------------------------------------------------------------------------------


def mse(output: ImageLike, reference: ImageLike) -> float:
    """Mean squared error over all pixels and channels (images in [0, 1])."""
    x, y = _pair(output, reference)
    return float(torch.mean((x - y) ** 2))


def rmse(output: ImageLike, reference: ImageLike) -> float:
    """Root mean squared error, in units of the [0, 1] data range (x 255 for grey levels)."""
    return math.sqrt(mse(output, reference))


def _psnr_from_mse(value: float, *, report_compat: bool = False) -> float:
    if value <= 0.0:
        return math.inf
    # report-compat: 20*log10(1/MSE) = 10*log10(1/MSE^2), i.e. the MSE treated as if it were an RMSE.
    return (20.0 if report_compat else 10.0) * math.log10(1.0 / value)


def psnr(output: ImageLike, reference: ImageLike) -> float:
    """Peak signal-to-noise ratio in dB with data range 1: 10 * log10(1 / MSE); ``math.inf`` if identical."""
    return _psnr_from_mse(mse(output, reference))


def ssim(output: ImageLike, reference: ImageLike) -> float:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, RGB mean."""
    x, y = _pair(output, reference)
    return _ssim(x, y)


def _ssim(x: Tensor, y: Tensor) -> float:
    import pytorch_msssim

    if min(x.shape[-2:]) < SSIM_WIN_SIZE:
        raise ImageError(
            f"images are {_size(x)} px; SSIM needs at least {SSIM_WIN_SIZE} px on each side (its window size)"
        )
    # pytorch-msssim builds its default window in float32, which alone moves SSIM by up to ~2e-6 (the
    # variances are small differences of large sums); with a float64 window it matches scikit-image to ~1e-14.
    coords = torch.arange(SSIM_WIN_SIZE, dtype=torch.float64, device=x.device) - SSIM_WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    win = (g / g.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    # data_range must be given: pytorch-msssim defaults to 255, which would inflate SSIM towards 1.
    value = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=True, win=win, K=(0.01, 0.03))
    return float(value)


def _check_convention(convention: str) -> bool:
    if convention not in CONVENTIONS:
        raise choice_error("metrics convention", convention, CONVENTIONS)
    return convention == "report-compat"


def image_metrics(
    output: ImageLike, reference: ImageLike, *, convention: str = "standard"
) -> dict[str, float]:
    """``{"mse", "rmse", "psnr", "ssim"}`` of ``output`` against ``reference``.

    ``convention="report-compat"`` fills "rmse" with the MSE and "psnr" with 20 * log10(1 / MSE), as the
    report's table does (use it only to compare with the report's numbers); "mse" and "ssim" are unchanged.
    """
    report_compat = _check_convention(convention)
    x, y = _pair(output, reference)
    m = float(torch.mean((x - y) ** 2))
    return {
        "mse": m,
        "rmse": m if report_compat else math.sqrt(m),
        "psnr": _psnr_from_mse(m, report_compat=report_compat),
        "ssim": _ssim(x, y),
    }


# --- judge: content and style distances ----------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """A fixed feature extractor that scores content and style (VGG-19, Gatys et al. layers)."""

    extractor: FeatureExtractor
    content_layers: tuple[str, ...] = JUDGE_CONTENT_LAYERS
    style_layers: tuple[str, ...] = JUDGE_STYLE_LAYERS

    @property
    def weights(self) -> WeightsInfo:
        return self.extractor.weights

    def features(self, image: ImageLike, what: str) -> dict[str, Tensor]:
        x = as_batch(image, what)
        min_side = self.extractor.spec.min_side(self.extractor.layers)
        if min(x.shape[-2:]) < min_side:
            raise ImageError(f"{what} is {_size(x)} px; the judge needs at least {min_side} px on each side")
        device = self.extractor.normalize.mean.device
        with torch.no_grad():
            return self.extractor.forward(x.to(device, torch.float32))


def make_judge(weights: str = "torchvision") -> Judge:
    """The VGG-19 judge. ``weights="random"`` is for tests only: its distances mean nothing perceptually."""
    layers = JUDGE_CONTENT_LAYERS + JUDGE_STYLE_LAYERS
    return Judge(build_extractor(get_spec("vgg19"), layers, weights))


def content_distance(output: ImageLike, content: ImageLike, judge: Judge) -> float:
    """Sum over the judge's content layers of the MSE between feature maps (same image size required)."""
    x, c = _pair(output, content, "content")
    fx, fc = judge.features(x, "output"), judge.features(c, "content")
    return float(sum(float(torch.mean((fx[k] - fc[k]) ** 2)) for k in judge.content_layers))


def style_distance(output: ImageLike, style: ImageLike, judge: Judge) -> float:
    """Sum over the judge's style layers of the MSE between size-normalised Gram matrices.

    The style image may have any size: Grams are normalised by C * H * W (see losses.gram_matrix).
    """
    fx, fs = judge.features(output, "output"), judge.features(style, "style")
    total = 0.0
    for k in judge.style_layers:
        total += float(torch.mean((gram_matrix(fx[k]) - gram_matrix(fs[k])) ** 2))
    return total


# --- LPIPS ---------------------------------------------------------------------------------------------


class LpipsWeightsError(WeightsError):
    """LPIPS's ImageNet backbone weights are not in torchvision's cache."""


def lpips_weights_path(net: str = "alex") -> Path:
    """Where torchvision caches the backbone LPIPS needs (the lpips package ships only its linear layers)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    if net not in LPIPS_NETS:
        raise choice_error("LPIPS network", net, LPIPS_NETS)
    url: str = (AlexNet_Weights if net == "alex" else VGG16_Weights).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


_LPIPS_CACHE: dict[tuple[str, str, int], nn.Module] = {}


def _lpips_model(net: str) -> nn.Module:
    path = lpips_weights_path(net)
    # Checked before lpips is touched: asked for a pretrained backbone, it would try to download it.
    if not path.is_file():
        builder = "alexnet" if net == "alex" else "vgg16"
        raise LpipsWeightsError(
            f"LPIPS ({net}) needs torchvision's ImageNet backbone at {path}, which is missing; download it "
            f"once on a machine with internet (torchvision.models.{builder}(weights='DEFAULT')) and copy "
            f"{path.name} there, or leave LPIPS off"
        )
    key = (net, str(path), path.stat().st_mtime_ns)
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    try:
        import lpips
    except ImportError:
        raise InputError("LPIPS needs the lpips package: pip install 'nstlab[lpips]'") from None
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the cached file is unusable
        raise LpipsWeightsError(
            f"cannot load LPIPS backbone weights from {path}: {exc}".splitlines()[0]
        ) from None
    with warnings.catch_warnings():
        # pnet_rand: lpips builds its trunk with torchvision's deprecated pretrained= flag; asking for a
        # random trunk and loading the cached file ourselves means no download can ever start.
        warnings.simplefilter("ignore")
        model: nn.Module = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    # lpips splits torchvision's model.features into slices that keep the module indices:
    # "slice2.3.weight" is torchvision's "features.3.weight".
    trunk = model.net
    assert isinstance(trunk, nn.Module)
    wanted = {k: "features." + k.split(".", 1)[1] for k in trunk.state_dict()}
    if not isinstance(state, dict) or any(v not in state for v in wanted.values()):
        raise LpipsWeightsError(f"{path} is not a torchvision {net} state dict (features.* keys missing)")
    try:
        trunk.load_state_dict({k: state[v] for k, v in wanted.items()}, strict=True)
    except RuntimeError as exc:
        raise LpipsWeightsError(
            f"{path} does not fit torchvision's {net}: {str(exc).splitlines()[0]}"
        ) from None
    model.eval().requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def lpips_distance(output: ImageLike, reference: ImageLike, net: str = "alex") -> float:
    """LPIPS (Zhang et al. 2018, v0.1) with an AlexNet or VGG-16 trunk; 0 for identical images.

    Raises :class:`LpipsWeightsError` when the trunk's ImageNet weights are not cached (never downloads).
    """
    if net not in LPIPS_NETS:
        raise choice_error("LPIPS network", net, LPIPS_NETS)
    x, y = _pair(output, reference)
    if min(x.shape[-2:]) < LPIPS_MIN_SIDE[net]:
        raise ImageError(
            f"images are {_size(x)} px; LPIPS ({net}) needs at least {LPIPS_MIN_SIDE[net]} px a side"
        )
    model = _lpips_model(net)
    with torch.no_grad():
        # LPIPS expects inputs in [-1, 1].
        d = model(x.float() * 2 - 1, y.float() * 2 - 1)
    return float(d.sum())


# --- one pair, many pairs ------------------------------------------------------------------------------


def evaluate_pair(
    output: ImageLike,
    reference: ImageLike,
    *,
    content: ImageLike | None = None,
    style: ImageLike | None = None,
    judge: Judge | None = None,
    lpips_net: str | None = None,
    convention: str = "standard",
) -> dict[str, float | bool | None]:
    """Image metrics, plus content/style distances (when ``content``/``style`` are given) and LPIPS.

    Without ``judge`` a pretrained one is built (needs cached VGG-19 weights); pass one to reuse it.
    ``judge_random_weights`` is None when no judge was used, and True when its distances are test-only.
    """
    report_compat = _check_convention(convention)
    row: dict[str, float | bool | None] = dict(image_metrics(output, reference, convention=convention))
    row["report_compat"] = report_compat
    row["judge_random_weights"] = None
    if content is not None or style is not None:
        judge = judge if judge is not None else make_judge()
        row["judge_random_weights"] = judge.weights.random
        if content is not None:
            row["content_distance"] = content_distance(output, content, judge)
        if style is not None:
            row["style_distance"] = style_distance(output, style, judge)
    if lpips_net is not None:
        row["lpips"] = lpips_distance(output, reference, lpips_net)
    return row


def _number(value: object) -> float | None:
    # bool is an int subclass, but a flag such as judge_random_weights is not a metric.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def aggregate(rows: Sequence[Mapping[str, float | bool | None]]) -> dict[str, dict[str, float]]:
    """Per metric: ``mean``, ``std`` and ``n`` over the rows that have it (None and bools are skipped).

    ``std`` is the sample standard deviation (ddof=1) for n > 1 and 0 for n = 1. Infinite values (PSNR of
    identical images) are kept, not turned into NaN: the mean is then inf, the std inf (0 if all values
    are inf), and ``n_inf`` counts them. ``psnr_of_mean_mse`` = {"value": 10 * log10(1 / mean MSE), "n"}
    is added when rows have "mse"; the report's tables use the mean of per-image PSNR (:data:`TABLE_PSNR`).
    """
    if not rows:
        raise InputError("no rows to aggregate")
    columns: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            v = _number(value)
            if v is None:
                continue
            if math.isnan(v):
                raise InputError(f"row {i}: {key} is NaN; fix the evaluation before aggregating")
            columns.setdefault(key, []).append(v)
    out: dict[str, dict[str, float]] = {}
    for key, values in columns.items():
        n = len(values)
        infinite = [v for v in values if math.isinf(v)]
        if infinite:
            if len(set(infinite)) > 1:
                raise InputError(f"{key} has both +inf and -inf values; its mean is undefined")
            # numpy would give nan for the mean of mixed +-inf and for any std involving inf.
            spread = 0.0 if len(infinite) == n else math.inf
            out[key] = {"mean": infinite[0], "std": spread, "n": float(n), "n_inf": float(len(infinite))}
        else:
            arr = np.asarray(values, dtype=np.float64)
            std = float(arr.std(ddof=1)) if n > 1 else 0.0
            out[key] = {"mean": float(arr.mean()), "std": std, "n": float(n)}
    if "mse" in out:
        out["psnr_of_mean_mse"] = {"value": _psnr_from_mse(out["mse"]["mean"]), "n": out["mse"]["n"]}
    return out


# --- display -------------------------------------------------------------------------------------------

_DISPLAY = (
    ("rmse", "RMSE", "↓"),
    ("psnr", "PSNR (dB)", "↑"),
    ("ssim", "SSIM", "↑"),
    ("mse", "MSE", "↓"),
    ("content_distance", "content", "↓"),
    ("style_distance", "style", "↓"),
    ("lpips", "LPIPS", "↓"),
)


def _fmt(key: str, value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3f}" if key == "psnr" else f"{value:.4f}" if key == "ssim" else f"{value:.6g}"


def format_table(metrics: Mapping[str, float | bool | None]) -> str:
    """A small plain-text table (metric, direction, value), e.g. for the CLI; None entries are skipped."""
    labels = {k: f"{name} {arrow}" for k, name, arrow in _DISPLAY}
    values = {k: v for k, raw in metrics.items() if (v := _number(raw)) is not None}
    ordered = [k for k in labels if k in values] + [k for k in values if k not in labels]
    rows = [(labels.get(k, k), _fmt(k, values[k])) for k in ordered]
    width = max([len("metric")] + [len(name) for name, _ in rows])
    vwidth = max([len("value")] + [len(v) for _, v in rows])
    lines = [f"{'metric':<{width}}  {'value':>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{name:<{width}}  {value:>{vwidth}}" for name, value in rows]
    if metrics.get("report_compat") is True:
        lines.append(
            "(report-compat: the RMSE row holds the MSE and PSNR = 20·log10(1/MSE), as in the report)"
        )
    if metrics.get("judge_random_weights") is True:
        lines.append("(judge has random weights: content/style distances are for tests only)")
    return "\n".join(lines)
