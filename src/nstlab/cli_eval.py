"""Command line for references and evaluation: ``nstlab reference`` and ``nstlab evaluate``.

``nstlab reference CONTENT STYLE -o REF.png`` writes a reference (pseudo ground truth, see
docs/reference.md) and its record REF.json. ``nstlab evaluate OUTPUT REFERENCE`` scores an output against
a reference image, or against a reference made on the spot by a named maker from the inputs in OUTPUT's run
record, and prints a table (optionally writes JSON; see docs/metrics.md, "Command line").

The lead's ``nstlab.cli`` hooks this in with :func:`add_parsers` and :func:`run`. Every failure is an
:class:`~nstlab.errors.NstlabError` with a one-line message (``InputError`` → exit 2); nothing is written
unless the whole command succeeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from nstlab.errors import ConfigError, ImageError, InputError, WeightsError, choice_error

__all__ = ["EVALUATION_FORMAT", "add_parsers", "run"]

EVALUATION_FORMAT = 1  # "nstlab_evaluation" in the JSON; bumped when the schema changes incompatibly
JUDGE_DEFAULT = "torchvision"
_MAKER_OPTIONS = ("alpha", "content_size", "style_size", "adain_weights", "reference_dir", "pair_name")


# --- parsers -------------------------------------------------------------------------------------------


def _add_maker_options(p: argparse.ArgumentParser, *, evaluate: bool) -> None:
    from nstlab.reference import ReferenceOptions

    d = ReferenceOptions()
    title = "reference maker options" + (" (only when REFERENCE is a maker name)" if evaluate else "")
    g = p.add_argument_group(title)
    g.add_argument(
        "--alpha",
        type=float,
        metavar="A",
        help=f"style strength in [0, 1]; 1 = full style (default: {d.alpha})",
    )
    g.add_argument(
        "--content-size",
        type=int,
        metavar="N",
        help=f"AdaIN: shorter side of the content before the encoder (default: {d.content_size})",
    )
    g.add_argument(
        "--style-size",
        type=int,
        metavar="N",
        help=f"AdaIN: shorter side of the style (default: {d.style_size})",
    )
    g.add_argument(
        "--adain-weights",
        metavar="DIR",
        help="folder holding vgg_normalised.pth and decoder.pth (offline; never downloads)",
    )
    g.add_argument(
        "--reference-dir", metavar="DIR", help="the folder maker's directory of precomputed images"
    )
    g.add_argument("--pair-name", metavar="NAME", help="folder maker: look for NAME.png/.jpg/.jpeg first")
    g.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the on-disk reference cache"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``reference`` and ``evaluate`` subcommands to ``sub`` (``dest="command"``)."""
    from nstlab.metrics import CONVENTIONS, LPIPS_NETS
    from nstlab.reference import MAKERS

    ref = sub.add_parser(
        "reference",
        help="make a reference (pseudo ground truth) image for a content/style pair",
        description="Make a reference image with a pretrained arbitrary-style network (or take it from a "
        "folder) and write it with a JSON record beside it (REF.json).",
    )
    ref.add_argument("content", help="content image")
    ref.add_argument("style", help="style image")
    ref.add_argument(
        "-o", "--output", required=True, help="reference image to write (.png, .jpg, .webp, .tif)"
    )
    ref.add_argument(
        "--maker",
        default="auto",
        metavar="|".join(MAKERS),
        help="auto = AdaIN if its weights are present, else Magenta (default: %(default)s)",
    )
    _add_maker_options(ref, evaluate=False)

    ev = sub.add_parser(
        "evaluate",
        help="score an output against a reference image or a maker's reference",
        description="Score OUTPUT against REFERENCE: an image file, or a maker name (auto, adain, magenta, "
        "folder) to make the reference from the content/style in OUTPUT's run record (OUTPUT.json) or from "
        "--content/--style. The reference is resized to OUTPUT's size (Lanczos) first.",
    )
    ev.add_argument("output", help="the image to score (e.g. an nstlab stylize output)")
    ev.add_argument("reference", help="reference image file, or a maker name: " + ", ".join(MAKERS))
    ev.add_argument("--content", metavar="C", help="content image (default: from OUTPUT's run record)")
    ev.add_argument("--style", metavar="S", help="style image (default: from OUTPUT's run record)")
    ev.add_argument(
        "--convention",
        default="standard",
        metavar="|".join(CONVENTIONS),
        help="report-compat reproduces the report's table (RMSE row = MSE, PSNR = 20·log10(1/MSE)); "
        "see docs/metrics.md (default: %(default)s)",
    )
    ev.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the results as JSON")
    ev.add_argument(
        "--judge-weights",
        metavar="torchvision|random|FILE",
        help="VGG-19 weights of the judge for content/style distances; random is for tests only "
        f"(default: {JUDGE_DEFAULT}; when its weights are missing, distances from the run record's "
        "inputs are skipped with a note, and asked-for ones are an error)",
    )
    ev.add_argument(
        "--lpips",
        metavar="|".join(LPIPS_NETS),
        help="also compute LPIPS with this trunk (needs cached weights)",
    )
    _add_maker_options(ev, evaluate=True)


def run(args: argparse.Namespace) -> int:
    """Run ``reference`` or ``evaluate``; raises NstlabError subclasses for the CLI to map to exit codes."""
    if args.command == "reference":
        return run_reference(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    raise ConfigError(f"nstlab.cli_eval cannot run the command {args.command!r}")


# --- helpers -------------------------------------------------------------------------------------------


def _note(message: str) -> None:
    print(f"nstlab: {message}", file=sys.stderr)


def _size(size: tuple[int, int] | list[int]) -> str:
    return f"{size[0]}×{size[1]}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _reference_options(args: argparse.Namespace) -> Any:
    from nstlab.reference import ReferenceOptions

    given: dict[str, Any] = {}
    for name in ("alpha", "content_size", "style_size", "adain_weights", "reference_dir"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    return ReferenceOptions(**given)


def _validate_maker(name: str) -> None:
    from nstlab.reference import MAKERS

    if name.strip().lower() not in MAKERS:
        raise choice_error("reference maker", name, MAKERS)


def _maker_line(ref: Any) -> str:
    """One line: which maker made it and why, and whether it came from the cache."""
    info = ref.info
    why = info.get("auto") or f"{ref.maker} (requested)"
    if info.get("cached"):
        where = f"from the cache {info.get('cache_file')}"
    elif info.get("cache_file"):
        where = f"computed and cached at {info['cache_file']}"
    elif ref.maker == "folder":
        where = f"file {info.get('settings', {}).get('file')}"
    else:
        where = "computed (not cached)"
    return f"reference maker: {why}; {where}"


def _json_safe(value: Any) -> Any:
    """Non-finite floats → None (JSON has no inf/NaN); containers are copied."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _dump(data: dict[str, Any]) -> str:
    # allow_nan=False: a stray inf/NaN must fail here, never produce invalid JSON.
    return json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n"


# --- nstlab reference ----------------------------------------------------------------------------------


def run_reference(args: argparse.Namespace) -> int:
    from nstlab import images
    from nstlab.api import check_sidecar_free, sidecar_path
    from nstlab.reference import make_reference

    out = Path(args.output)
    images.check_output_path(out, "reference.png")
    check_sidecar_free(out)
    for what, given in (("content", args.content), ("style", args.style)):
        if _same_file(out, Path(given)):
            raise ConfigError(f"output {out} is the {what} image; choose another file name")
    _validate_maker(args.maker)
    opts = _reference_options(args)
    ref = make_reference(
        args.content,
        args.style,
        args.maker,
        options=opts,
        pair_name=args.pair_name,
        use_cache=not args.no_cache,
    )
    record_path = sidecar_path(out)
    text = _dump({"image": str(out), **ref.info})  # serialised before anything is written
    images.save_image(ref.image, out)
    images.write_text_atomic(record_path, text)
    _note(_maker_line(ref))
    cached = ", cached" if ref.info.get("cached") else ""
    print(f"saved {out} ({ref.maker}, {_size(ref.image.size)}{cached}); record: {record_path}")
    return 0


# --- nstlab evaluate -----------------------------------------------------------------------------------


@dataclass
class _Input:
    """A content or style image for evaluate: where it came from and whether the user asked for it."""

    what: str
    path: Path
    origin: str  # "option" | "record"
    explicit: bool
    image: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Image.Image:
        from nstlab import images

        if self.image is None:
            self.image = images.load_image(self.path)
        return self.image

    def record(self) -> dict[str, Any]:
        from nstlab import images

        img = self.load()
        return {
            "path": str(self.path),
            "from": self.origin,
            "sha256": images.file_sha256(self.path),
            "size": list(img.size),
            **self.extra,
        }


_GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _channels(path: Path) -> tuple[int, str]:
    """(channels, mode) as stored in the file: 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha."""
    with Image.open(path) as f:
        mode = f.mode
        alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in f.info
    colour = mode not in _GREY_MODES and mode not in ("LA", "La")
    return (3 if colour else 1) + (1 if alpha else 0), mode


def _check_channels(output: Path, reference: Path) -> None:
    (co, mo), (cr, mr) = _channels(output), _channels(reference)
    if co != cr:
        names = {1: "grey", 2: "grey + alpha", 3: "colour", 4: "colour + alpha"}
        raise ImageError(
            f"output {output} has {co} channel{'s' if co > 1 else ''} ({names[co]}, mode {mo}) but reference "
            f"{reference} has {cr} ({names[cr]}, mode {mr}); save both as RGB (no alpha) so they compare "
            "the same channels"
        )


# Sizes rounded to whole pixels (AdaIN's multiples of 8 at small sizes included) change the aspect ratio
# by a few percent at most; more than this means an image of another shape, most likely the wrong file.
ASPECT_TOLERANCE = 0.05


def _warn_if_stretched(
    notes: list[str], what: str, path: object, size: tuple[int, int], target: tuple[int, int]
) -> None:
    change = (size[0] / size[1]) / (target[0] / target[1]) - 1
    if abs(change) > ASPECT_TOLERANCE:
        notes.append(
            f"WARNING: the {what} {path} ({_size(size)}) has another aspect ratio than the output "
            f"({_size(target)}, {change:+.0%}) and was stretched to it; is it the right file?"
        )


def _read_record(output: Path) -> tuple[dict[str, Any] | None, str]:
    """(OUTPUT's run record or None, why there is none)."""
    from nstlab.api import sidecar_path

    path = sidecar_path(output)
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path} is not readable JSON ({' '.join(str(exc).split())})"
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, dict):
        return None, f"{path} is not an nstlab run record (no 'inputs')"
    named = data.get("output")
    if isinstance(named, str) and Path(named).name != output.name:
        # out.png and out.jpg share out.json: a record of the other image says nothing about this one
        return None, f"{path} is the record of {Path(named).name}, not of {output.name}"
    return data, ""


def _input_from_record(
    record: dict[str, Any] | None, why: str, what: str, output: Path, notes: list[str]
) -> tuple[_Input | None, str]:
    """The content/style named by the record (path checked), or None and the reason."""
    from nstlab import images
    from nstlab.api import sidecar_path

    if record is None:
        return None, why
    entry = record["inputs"].get(what)
    source = entry.get("source") if isinstance(entry, dict) else None
    if not isinstance(source, str) or source.startswith("<"):
        return None, f"the run record {sidecar_path(output)} has no {what} file (source {source!r})"
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [path, sidecar_path(output).parent / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        return None, (
            f"the {what} image {source} named in the run record {sidecar_path(output)} was not found "
            f"(looked in {', '.join(str(p) for p in dict.fromkeys(candidates))})"
        )
    extra: dict[str, Any] = {"record_source": source}
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if isinstance(recorded, str) and recorded != images.file_sha256(found):
        notes.append(
            f"WARNING: the {what} image {found} has changed since {output} was made (sha256 differs)"
        )
        extra["changed_since_record"] = True
    return _Input(what, found, "record", explicit=False, extra=extra), ""


def _build_judge(weights: str) -> Any:
    from nstlab import metrics

    # torch.hub writes "Downloading: ..." to stdout (which holds our table) before it tries the network:
    # shown on stderr when the download worked, dropped when it failed (the WeightsError says it all).
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            judge = metrics.make_judge(weights)
    except WeightsError as exc:
        # The message names the stylize option; here the judge's weights are --judge-weights.
        raise WeightsError(
            "the judge for content/style distances: " + str(exc).replace("--weights", "--judge-weights")
        ) from None
    finally:
        captured = buffer.getvalue()
    if captured:
        sys.stderr.write(captured)
    return judge


def _check_json_target(json_path: Path, protected: dict[str, Path]) -> None:
    if json_path.is_dir():
        raise ConfigError(
            f"--json {json_path} is a directory; give a file name such as {json_path / 'eval.json'}"
        )
    for what, path in protected.items():
        if _same_file(json_path, path):
            raise ConfigError(f"--json {json_path} would overwrite the {what}; choose another file name")


def run_evaluate(args: argparse.Namespace) -> int:
    from nstlab import images, metrics
    from nstlab.api import sidecar_path, versions
    from nstlab.reference import MAKERS, align_to_output, make_reference

    # Notes and warnings are printed only once everything worked, so that a failure is one line.
    notes: list[str] = []
    # Cheap checks first, so that a typo never waits for a network or a model.
    if args.convention not in metrics.CONVENTIONS:
        raise choice_error("metrics convention", args.convention, metrics.CONVENTIONS)
    if args.lpips is not None and args.lpips not in metrics.LPIPS_NETS:
        raise choice_error("LPIPS network", args.lpips, metrics.LPIPS_NETS)

    output = Path(args.output)
    out_img = images.load_image(output)
    ref_arg: str = args.reference
    ref_path = Path(ref_arg)
    # A maker name wins over a file of the same name in the current directory (write ./magenta for that).
    is_maker = ref_arg.strip().lower() in MAKERS
    if not is_maker and not ref_path.exists() and not ref_path.suffix and "/" not in ref_arg:
        raise choice_error("reference maker", ref_arg, MAKERS)  # neither a file nor a known maker
    ref_img: Image.Image | None = None
    if not is_maker:
        given = [f"--{n.replace('_', '-')}" for n in _MAKER_OPTIONS if getattr(args, n) is not None]
        given += ["--no-cache"] if args.no_cache else []
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise ConfigError(
                f"{', '.join(given)} {verb} only used when REFERENCE is a maker name ({', '.join(MAKERS)}), "
                f"not with the image file {ref_arg}"
            )
        ref_img = images.load_image(ref_path)
        _check_channels(output, ref_path)
    opts = _reference_options(args) if is_maker else None

    record, no_record = _read_record(output)
    inputs: dict[str, _Input | None] = {}
    missing: dict[str, str] = {}
    for what in ("content", "style"):
        given_path = getattr(args, what)
        if given_path is not None:
            item = _Input(what, Path(given_path), "option", explicit=True)
            item.load()  # ImageError now, before any work
            inputs[what] = item
        else:
            inputs[what], missing[what] = _input_from_record(record, no_record, what, output, notes)
    c_item, s_item = inputs["content"], inputs["style"]
    if is_maker and (c_item is None or s_item is None):
        lacking = [w for w in ("content", "style") if inputs[w] is None]
        reasons = "; ".join(dict.fromkeys(missing[w] for w in lacking if missing.get(w)))
        raise InputError(
            f"the {ref_arg} reference needs the {' and '.join(lacking)} image of {output}, but {reasons}; "
            f"pass {' and '.join('--' + w for w in lacking)}"
        )

    if args.json_path is not None:
        protected = {"output image": output, "output's run record": sidecar_path(output)}
        if not is_maker:
            protected |= {"reference image": ref_path, "reference's record": sidecar_path(ref_path)}
        for what, maybe in inputs.items():
            if maybe is not None:
                protected[f"{what} image"] = maybe.path
        _check_json_target(Path(args.json_path), protected)

    # The judge for content/style distances: asked for explicitly (--content, --style or --judge-weights),
    # or used opportunistically with the inputs of the run record (and skipped when it has no weights).
    judge_weights = args.judge_weights if args.judge_weights is not None else JUDGE_DEFAULT
    explicit = any(i is not None and i.explicit for i in inputs.values()) or args.judge_weights is not None
    judge = None
    skipped: str | None = None
    if c_item is not None or s_item is not None:
        try:
            judge = _build_judge(judge_weights)
        except WeightsError as exc:
            if explicit:
                raise
            skipped = f"the judge's weights ({judge_weights}) are not available: {exc}"
            notes.append(
                f"note: skipping content/style distances: no VGG-19 judge weights ({judge_weights}) here; "
                "pass --judge-weights FILE to compute them"
            )
        if judge is not None and judge.weights.random:
            notes.append("WARNING: the judge has RANDOM weights: content/style distances are for tests only")
    elif args.judge_weights is not None:
        raise InputError(
            "--judge-weights needs a content or style image: pass --content/--style, or evaluate an output "
            f"with a run record ({missing.get('content') or no_record})"
        )

    # The reference.
    ref_entry: dict[str, Any]
    if is_maker:
        assert opts is not None and c_item is not None and s_item is not None
        ref = make_reference(
            c_item.path,
            s_item.path,
            ref_arg,
            options=opts,
            pair_name=args.pair_name,
            use_cache=not args.no_cache,
        )
        notes.append(_maker_line(ref))
        ref_img = ref.image
        ref_entry = {
            "kind": "maker",
            "path": ref.info.get("cache_file"),
            "sha256": None,
            "maker": ref.maker,
            "requested": ref_arg,
            "label": ref.label,
            "cached": bool(ref.info.get("cached")),
            "info": ref.info,
        }
    else:
        ref_info = _reference_record(ref_path)
        ref_entry = {
            "kind": "file",
            "path": str(ref_path),
            "sha256": images.file_sha256(ref_path),
            "maker": None if ref_info is None else ref_info.get("maker"),
            "requested": None,
            "label": None if ref_info is None else ref_info.get("label"),
            "cached": None,
            "info": ref_info,
        }
    assert ref_img is not None
    native = ref_img.size
    aligned = align_to_output(ref_img, out_img.size)
    ref_entry |= {
        "size": list(native),
        "aligned_from": list(native) if native != out_img.size else None,
        "aligned_to": list(out_img.size),
    }
    if native != out_img.size:
        notes.append(
            f"reference resized from {_size(native)} to the output's {_size(out_img.size)} (Lanczos)"
        )
        _warn_if_stretched(notes, "reference", ref_arg, native, out_img.size)

    content_t = style_t = None
    if judge is not None and c_item is not None:
        c_img = c_item.load()
        if c_img.size != out_img.size:
            c_item.extra["resized_to"] = list(out_img.size)
            _warn_if_stretched(notes, "content image", c_item.path, c_img.size, out_img.size)
            c_img = images.resize_to(c_img, out_img.size)
        content_t = images.to_tensor(c_img)
    if judge is not None and s_item is not None:
        style_t = images.to_tensor(s_item.load())

    row = metrics.evaluate_pair(
        images.to_tensor(out_img),
        images.to_tensor(aligned),
        content=content_t,
        style=style_t,
        judge=judge,
        lpips_net=args.lpips,
        convention=args.convention,
    )
    values = {k: v for k, v in row.items() if k not in ("report_compat", "judge_random_weights")}
    psnr = row["psnr"]
    random_output = None if record is None else bool(record.get("random_weights"))
    if random_output:
        notes.append(f"WARNING: {output} was made with RANDOM weights (its run record says so)")

    result: dict[str, Any] = {
        "nstlab_evaluation": EVALUATION_FORMAT,
        "output": {
            "path": str(output),
            "sha256": images.file_sha256(output),
            "size": list(out_img.size),
            "record": None if record is None else str(sidecar_path(output)),
            "random_weights": random_output,
        },
        "reference": ref_entry,
        "convention": args.convention,
        "report_compat": bool(row["report_compat"]),
        "metrics": values,
        "psnr_infinite": isinstance(psnr, float) and math.isinf(psnr),
        "judge_random_weights": row["judge_random_weights"],
        "judge": None
        if judge is None
        else {
            "weights": judge.weights.as_dict(),
            "content_layers": list(judge.content_layers),
            "style_layers": list(judge.style_layers),
        },
        "distances_skipped": skipped,
        "lpips_net": args.lpips,
        "inputs": {w: (None if item is None else item.record()) for w, item in inputs.items()},
        "sizes": {
            "output": list(out_img.size),
            "reference": list(native),
            "content": None if c_item is None else list(c_item.load().size),
            "style": None if s_item is None else list(s_item.load().size),
        },
        "versions": versions(),
    }
    text = _dump(result)
    if args.json_path is not None:
        images.write_text_atomic(args.json_path, text)
    for line in notes:
        _note(line)
    label = ref_entry["label"] or ref_entry["path"]
    print(f"{output} vs {label}" + (" (cached reference)" if ref_entry["cached"] else ""))
    print(metrics.format_table(row))
    return 0


def _reference_record(ref_path: Path) -> dict[str, Any] | None:
    """The record `nstlab reference` wrote beside a reference image, when there is one."""
    from nstlab.api import sidecar_path
    from nstlab.reference import MAKERS

    path = sidecar_path(ref_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and data.get("maker") in MAKERS and "label" in data:
        return data
    return None
