"""AdaIN reference maker: Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization", ICCV 2017, with the published weights of naoto0804/pytorch-AdaIN (release v0.0.0).

The architecture below is the one of that repository's ``net.py`` module by module, so that its
``vgg_normalised.pth`` and ``decoder.pth`` load with ``strict=True`` under the same keys ("0.weight", ...):

* ``vgg`` — the "normalised" VGG-19 of the original Lua/Torch AdaIN code. Module 0 is a 1×1 conv that
  folds the Caffe preprocessing (RGB→BGR, ×255, mean subtraction) into a linear map, so the network takes
  RGB in [0, 1]. Every 3×3 conv is preceded by ReflectionPad2d(1) and followed by ReLU, with
  MaxPool2d(2, 2, ceil_mode=True) between blocks. The file holds all layers up to relu5_4 (53 modules); the
  encoder f is ``vgg[:31]``, i.e. up to relu4_1 (paper, Sec. 6.1: f is the first layers of VGG-19 up to
  relu4_1).
* ``decoder`` g — mirrors the encoder with nearest-neighbour upsampling in place of pooling, reflection
  padding and no normalisation layers (paper, Sec. 6.1).
* AdaIN (paper, Eq. 8): AdaIN(x, y) = σ(y)·(x − μ(x))/σ(x) + μ(y), statistics per sample and channel over
  the spatial dimensions; σ uses the unbiased variance + eps as in the repository's ``calc_mean_std``.
* Content–style trade-off (paper, Eq. 14): T(c, s, α) = g((1 − α)·f(c) + α·AdaIN(f(c), f(s))).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from nstlab.errors import ConfigError, DeviceError, ImageError, InputError, WeightsError
from nstlab.images import to_pil, to_tensor
from nstlab.network import ENV_VAR as OFFLINE_VAR
from nstlab.network import offline
from nstlab.reference.base import MIN_SIZE, ReferenceOptions, cached_file_sha256

__all__ = [
    "ADAIN_FILES",
    "ADAIN_RELEASE",
    "ADAIN_SHA256",
    "ADAIN_URLS",
    "ENCODER_DEPTH",
    "AdaINNet",
    "adain",
    "build_decoder",
    "build_vgg",
    "calc_mean_std",
    "default_weights_dir",
    "ensure_weights",
    "find_weights",
    "load_adain",
    "output_size",
    "render",
    "resize_shorter",
    "verify_sha256",
]

log = logging.getLogger(__name__)

ADAIN_RELEASE = "https://github.com/naoto0804/pytorch-AdaIN/releases/download/v0.0.0/"
VGG_FILE = "vgg_normalised.pth"
DECODER_FILE = "decoder.pth"
ADAIN_FILES: tuple[str, str] = (VGG_FILE, DECODER_FILE)
ADAIN_URLS: dict[str, str] = {name: ADAIN_RELEASE + name for name in ADAIN_FILES}

# Expected SHA-256 of the two release files. Deliberately None: they could not be downloaded while this
# module was written, and a digest that was not computed from a trusted download must never be written
# here. A maintainer should download both files once from ADAIN_URLS, check them, and fill this in as
# {"vgg_normalised.pth": "<64 hex>", "decoder.pth": "<64 hex>"}. Until then the sha256 of whatever was
# loaded is recorded in the reference info with "verified": False, and a warning is logged.
ADAIN_SHA256: dict[str, str] | None = None

ENCODER_DEPTH = 31  # vgg[:31] ends at relu4_1 (the official test.py: list(vgg.children())[:31])
DOWNLOAD_TIMEOUT_S = 60.0
EPS = 1e-5


# --- architecture (naoto0804/pytorch-AdaIN, net.py) ------------------------------------------------------


def _pad() -> nn.ReflectionPad2d:
    return nn.ReflectionPad2d((1, 1, 1, 1))


def _pool() -> nn.MaxPool2d:
    # ceil_mode=True (as in the Torch original): odd sides round *up*, e.g. 91 → 46 → 23 → 12.
    return nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)


def _up() -> nn.Upsample:
    # net.py writes nn.UpsamplingNearest2d(scale_factor=2) (older versions) or nn.Upsample(..., 'nearest');
    # both are the same parameter-free op, so the state-dict keys do not change.
    return nn.Upsample(scale_factor=2, mode="nearest")


def build_vgg() -> nn.Sequential:
    """The full normalised VGG-19 of the AdaIN repo (53 modules, up to relu5_4), randomly initialised."""
    layers: list[nn.Module] = [nn.Conv2d(3, 3, (1, 1))]  # 0: Caffe BGR/mean preprocessing as a 1×1 conv
    # (in, out) channels per 3×3 conv; "M" = max-pool. Blocks of 2, 2, 4, 4, 4 convs (VGG-19).
    plan: list[tuple[int, int] | str] = [
        (3, 64), (64, 64), "M",  # relu1_1 = module 3, relu1_2 = 6
        (64, 128), (128, 128), "M",  # relu2_1 = 10, relu2_2 = 13
        (128, 256), (256, 256), (256, 256), (256, 256), "M",  # relu3_1 = 17 ... relu3_4 = 26
        (256, 512), (512, 512), (512, 512), (512, 512), "M",  # relu4_1 = 30 (last used) ... relu4_4 = 39
        (512, 512), (512, 512), (512, 512), (512, 512),  # relu5_1 = 43 ... relu5_4 = 52
    ]  # fmt: skip
    for step in plan:
        if isinstance(step, str):
            layers.append(_pool())
        else:
            layers += [_pad(), nn.Conv2d(step[0], step[1], (3, 3)), nn.ReLU()]
    return nn.Sequential(*layers)


def build_decoder() -> nn.Sequential:
    """The AdaIN decoder g of the repo's net.py (29 modules, relu4_1 features → RGB), randomly initialised."""
    # (in, out) per 3×3 conv; "U" = nearest ×2 upsampling. No ReLU after the last conv (output is unbounded).
    plan: list[tuple[int, int] | str] = [
        (512, 256), "U",
        (256, 256), (256, 256), (256, 256), (256, 128), "U",
        (128, 128), (128, 64), "U",
        (64, 64), (64, 3),
    ]  # fmt: skip
    layers: list[nn.Module] = []
    for i, step in enumerate(plan):
        if isinstance(step, str):
            layers.append(_up())
        else:
            layers += [_pad(), nn.Conv2d(step[0], step[1], (3, 3))]
            if i < len(plan) - 1:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# --- the AdaIN operation (function.py) -------------------------------------------------------------------


def _check_feat(feat: Tensor, what: str) -> None:
    if feat.dim() != 4:
        raise InputError(f"AdaIN needs {what} features of shape (N, C, H, W), got {tuple(feat.shape)}")
    if feat.shape[2] * feat.shape[3] < 2:
        raise InputError(
            f"AdaIN {what} features are {feat.shape[2]}×{feat.shape[3]}: the unbiased variance needs at "
            f"least 2 positions; use larger images (shorter side >= {MIN_SIZE} px)"
        )


def calc_mean_std(feat: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and std over H×W, shaped (N, C, 1, 1).

    As in the repository's function.py: std = sqrt(var + eps) with the *unbiased* variance (torch's default,
    divisor H·W − 1); eps avoids division by zero on flat channels.
    """
    _check_feat(feat, "input")
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1)
    var = flat.var(dim=2) + eps
    return flat.mean(dim=2).view(n, c, 1, 1), var.sqrt().view(n, c, 1, 1)


def adain(content_feat: Tensor, style_feat: Tensor, eps: float = EPS) -> Tensor:
    """Adaptive instance normalisation (Huang & Belongie 2017, Eq. 8): (c − μc)/σc · σs + μs."""
    _check_feat(content_feat, "content")
    _check_feat(style_feat, "style")
    if content_feat.shape[:2] != style_feat.shape[:2]:
        raise InputError(
            "AdaIN needs content and style features with the same batch size and channels, got "
            f"{tuple(content_feat.shape[:2])} and {tuple(style_feat.shape[:2])}"
        )
    c_mean, c_std = calc_mean_std(content_feat, eps)
    s_mean, s_std = calc_mean_std(style_feat, eps)
    return (content_feat - c_mean) / c_std * s_std + s_mean


class AdaINNet(nn.Module):
    """Encoder f = vgg[:31] (to relu4_1), AdaIN, decoder g; frozen, in eval mode."""

    def __init__(self, vgg: nn.Sequential, decoder: nn.Sequential) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*list(vgg.children())[:ENCODER_DEPTH])
        self.decoder = decoder
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _check_image(x: Tensor, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            got = f"{x.shape[1]} channels" if x.dim() == 4 else f"shape {tuple(x.shape)}"
            raise ImageError(f"AdaIN needs the {what} image as an RGB tensor (N, 3, H, W), got {got}")
        if min(x.shape[2], x.shape[3]) < MIN_SIZE:
            raise ImageError(
                f"the {what} image is {x.shape[3]}×{x.shape[2]} px; AdaIN needs at least {MIN_SIZE} px a side"
            )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # type: ignore[no-any-return]

    def decode(self, t: Tensor) -> Tensor:
        return self.decoder(t)  # type: ignore[no-any-return]

    def forward(self, content: Tensor, style: Tensor, alpha: float = 1.0) -> Tensor:
        """RGB [0, 1] content and style (N, 3, H, W) → decoded image, unclamped (test.py's style_transfer)."""
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"AdaIN alpha must be in [0, 1], got {alpha}")
        self._check_image(content, "content")
        self._check_image(style, "style")
        fc = self.encode(content)
        fs = self.encode(style)
        t = alpha * adain(fc, fs) + (1.0 - alpha) * fc  # paper Eq. 14
        return self.decode(t)


# --- sizes -----------------------------------------------------------------------------------------------


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, exactly as torchvision's ``transforms.Resize(size)`` in the
    official test.py (bilinear with antialiasing; the longer side is ``int(size * long / short)``)."""
    import torchvision.transforms.functional as TF

    out = TF.resize(img, size)
    if not isinstance(out, Image.Image):  # pragma: no cover - torchvision returns PIL for PIL input
        raise TypeError("torchvision resize did not return a PIL image")
    return out


def resized_size(size_wh: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) after :func:`resize_shorter` (torchvision truncates the longer side)."""
    w, h = size_wh
    if w <= h:
        return shorter, int(shorter * h / w)
    return int(shorter * w / h), shorter


def output_size(content_wh: tuple[int, int], content_size: int) -> tuple[int, int]:
    """(width, height) of AdaIN's output for a content image of ``content_wh``: three ceil-mode poolings then
    three ×2 upsamplings, so each side becomes 8·ceil(ceil(ceil(side/2)/2)/2) = 8·ceil(side/8)."""
    w, h = resized_size(content_wh, content_size)
    return 8 * -(-w // 8), 8 * -(-h // 8)


# --- weights ---------------------------------------------------------------------------------------------


def default_weights_dir(cache_root: Path) -> Path:
    return cache_root / "weights" / "adain"


def find_weights(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """(files found, names missing) for the two AdaIN files in ``directory``."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in ADAIN_FILES:
        p = directory / name
        if p.is_file():
            found[name] = p
        else:
            missing.append(name)
    return found, missing


def verify_sha256(path: Path, name: str) -> tuple[str, bool | None]:
    """(sha256, verified) of a weights file; verified is None when no expected digest is recorded.

    Raises WeightsError when an expected digest exists and the file does not match it.
    """
    digest = cached_file_sha256(path)
    expected = (ADAIN_SHA256 or {}).get(name)
    if expected is None:
        return digest, None
    if digest.lower() != expected.lower():
        raise WeightsError(
            f"{path} has sha256 {digest}, not the published {name} ({expected}); it is corrupt or a "
            f"different checkpoint; delete it and download it again from {ADAIN_URLS[name]}"
        )
    return digest, True


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class DownloadError(WeightsError):
    """The AdaIN weights are missing and fetching them failed; ``reason`` is the network's one-line why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _download(url: str, dest: Path, name: str) -> None:
    """Stream ``url`` to ``dest`` atomically (temp file + rename), checking the sha256 when it is known."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as f:
            length = resp.headers.get("Content-Length")
            size = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        # A dropped connection ends read() early without an error, and no digest is published to catch it:
        # check the length the server announced, and that the bytes are a checkpoint at all (not an HTML
        # error page from a proxy). OSError: the caller reports it as a failed download.
        if length is not None and length.isdigit() and size != int(length):
            raise OSError(f"incomplete download of {name}: {size} of {int(length)} bytes")
        try:
            _load_state(tmp)
        except WeightsError:
            raise OSError(f"the download of {name} from {url} is not a PyTorch checkpoint") from None
        expected = (ADAIN_SHA256 or {}).get(name)
        if expected is not None and digest.hexdigest().lower() != expected.lower():
            raise WeightsError(
                f"the download of {name} from {url} has sha256 {digest.hexdigest()}, expected {expected}; "
                "it was discarded (truncated download or the release changed)"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _missing_message(directory: Path, missing: list[str], extra: str = "") -> str:
    urls = " and ".join(ADAIN_URLS[n] for n in ADAIN_FILES)
    return (
        f"AdaIN weights not found: {' and '.join(missing)} missing in {directory}{extra}. Ways out: download "
        f"{' and '.join(ADAIN_FILES)} from {urls} into {directory}; or pass --adain-weights DIR (a folder "
        "holding both files); or use --reference magenta (no download needed)"
    )


def ensure_weights(options: ReferenceOptions, cache_root: Path, *, download: bool = True) -> dict[str, Path]:
    """Paths of vgg_normalised.pth and decoder.pth.

    With ``options.adain_weights`` the files must be in that directory (offline; never downloads).
    Otherwise they are looked up in ``<cache root>/weights/adain`` and, if ``download``, fetched there from
    the v0.0.0 release on first use. Missing files raise a one-line WeightsError with the ways out.
    """
    explicit = options.adain_weights is not None
    directory = (
        options.adain_weights if options.adain_weights is not None else default_weights_dir(cache_root)
    )
    if explicit and directory.exists() and not directory.is_dir():
        raise WeightsError(
            f"--adain-weights must be a directory holding {' and '.join(ADAIN_FILES)}: {directory}"
        )
    found, missing = find_weights(directory)
    if not missing:
        return found
    if explicit or not download:
        raise WeightsError(_missing_message(directory, missing))
    if offline():
        raise WeightsError(
            _missing_message(directory, missing, f" ({OFFLINE_VAR} is set: no download tried)")
        )
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a closed network must fail, not hang
    try:
        for name in missing:
            log.info("downloading AdaIN weights %s from %s", name, ADAIN_URLS[name])
            _download(ADAIN_URLS[name], directory / name, name)
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        reason = _one_line(exc) or type(exc).__name__
        raise DownloadError(
            _missing_message(directory, missing, f" and the download failed ({reason})"), reason
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    found, missing = find_weights(directory)
    if missing:  # pragma: no cover - _download either writes the file or raises
        raise WeightsError(_missing_message(directory, missing))
    return found


def _load_state(path: Path) -> Mapping[str, Tensor]:
    try:
        # weights_only: a checkpoint is data; never unpickle arbitrary objects from a downloaded file.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable state dict"
        raise WeightsError(
            f"cannot load AdaIN weights {path}: {type(exc).__name__}: {_one_line(exc)[:200]}; "
            "re-download the file"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_into(model: nn.Module, path: Path, what: str) -> None:
    """load_state_dict(strict=True); a key or shape mismatch becomes a one-line WeightsError."""
    state = _load_state(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes {_first(shapes)} (file vs model)")
        detail = "; ".join(parts) or "load_state_dict failed"
        raise WeightsError(
            f"{path} does not fit the AdaIN {what} of naoto0804/pytorch-AdaIN ({detail}); "
            f"use the original {path.name} from {ADAIN_URLS.get(path.name, ADAIN_RELEASE)}"
        ) from None


_MODEL_CACHE: dict[tuple[str, str, str], AdaINNet] = {}


def resolve_torch_device(name: str) -> torch.device:
    from nstlab.api import resolve_device

    try:
        return resolve_device(name)
    except DeviceError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown reference device {name!r} ({_one_line(exc)}); use cpu or cuda") from None


def load_adain(files: Mapping[str, Path], device: str = "cpu") -> AdaINNet:
    """Build vgg and decoder, load both files strictly, slice the encoder to relu4_1, move to ``device``.

    The last loaded model is kept (keyed by the files' sha256 and the device) so repeated references in one
    process do not reload ~95 MB of weights.
    """
    dev = resolve_torch_device(device)
    key = (cached_file_sha256(files[VGG_FILE]), cached_file_sha256(files[DECODER_FILE]), str(dev))
    model = _MODEL_CACHE.get(key)
    if model is None:
        vgg = build_vgg()
        decoder = build_decoder()
        load_into(vgg, files[VGG_FILE], "encoder (vgg)")  # the full Sequential, strict
        load_into(decoder, files[DECODER_FILE], "decoder")
        model = AdaINNet(vgg, decoder).to(dev)  # the slice to relu4_1 happens after loading
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
    return model


_WARNED: set[tuple[str, str]] = set()


def weights_record(files: Mapping[str, Path]) -> dict[str, Any]:
    """{file name: {path, sha256, verified, url}}; logs a warning for unverified files."""
    record: dict[str, Any] = {}
    for name in ADAIN_FILES:
        digest, verified = verify_sha256(files[name], name)
        if verified is None and (str(files[name]), digest) not in _WARNED:
            _WARNED.add((str(files[name]), digest))
            log.warning(
                "AdaIN weights %s (sha256 %s) NOT verified: no expected digest is recorded in "
                "nstlab.reference.adain.ADAIN_SHA256",
                files[name],
                digest,
            )
        record[name] = {
            "path": str(files[name]),
            "sha256": digest,
            "verified": bool(verified),
            "url": ADAIN_URLS[name],
        }
    return record


def render(
    content: Image.Image, style: Image.Image, options: ReferenceOptions, files: Mapping[str, Path]
) -> tuple[Image.Image, dict[str, Any]]:
    """Run AdaIN on RGB PIL images as the official test.py does; returns (image, maker-specific info)."""
    model = load_adain(files, options.device)
    dev = next(model.parameters()).device
    c_img = resize_shorter(content, options.content_size)
    s_img = resize_shorter(style, options.style_size)
    # test.py uses transforms.ToTensor() only: RGB in [0, 1], no ImageNet normalisation (module 0 does it).
    c = to_tensor(c_img).to(dev)
    s = to_tensor(s_img).to(dev)
    with torch.no_grad():
        out = model(c, s, options.alpha)
    image = to_pil(out.clamp(0.0, 1.0))  # torchvision's save_image clamps to [0, 1] as well
    info = {
        "paper": "Huang & Belongie 2017, Arbitrary Style Transfer in Real-time with Adaptive Instance "
        "Normalization",
        "implementation": "naoto0804/pytorch-AdaIN (net.py, test.py), release v0.0.0 weights",
        "alpha": options.alpha,
        "content_size": options.content_size,
        "style_size": options.style_size,
        "resize": "shorter side to content_size/style_size, torchvision Resize (bilinear, antialias)",
        "content_input_size": list(c_img.size),
        "style_input_size": list(s_img.size),
        "output_size": list(image.size),
        "encoder": "normalised VGG-19 vgg[:31] (to relu4_1)",
        "eps": EPS,
        "device": str(dev),
    }
    return image, info
