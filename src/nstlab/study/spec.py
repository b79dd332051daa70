"""Study files (TOML) and grid expansion: which (pair x setting) jobs a study consists of.

A study file::

    name = "optimizers"
    pairs = "../../shared/data/pairs.csv"       # relative to this file; or a list of {name, content, style}
    [base]                                      # StylizeConfig fields shared by every job
    size = 512
    [axes]                                      # each axis: a list of values for one config field...
    optimizer = ["lbfgs", { optimizer = "adam", lr = [0.001, 0.01, 0.1] }]
    [reference]                                 # pseudo ground truth maker and options
    maker = "auto"
    [metrics]
    names = ["rmse", "psnr", "ssim"]

An axis value is either a plain value for the axis's field, or a table of fields set together; a list inside
such a table expands into one setting per element (the optimiser with its own lr list). Several axes form
their cartesian product.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nstlab.config import StylizeConfig
from nstlab.errors import ConfigError, InputError, choice_error
from nstlab.images import file_sha256

if TYPE_CHECKING:
    from nstlab.reference import ReferenceOptions

# Bump when a change to the engine changes what a config computes: old results then stop matching.
ALGORITHM_VERSION = 1
TOP_KEYS = ("name", "description", "pairs", "pair_names", "base", "axes", "reference", "metrics", "output")
REFERENCE_KEYS = ("maker", "alpha", "content_size", "style_size", "adain_weights", "reference_dir")
METRIC_NAMES = ("mse", "rmse", "psnr", "ssim", "content", "style", "lpips")
DEFAULT_METRICS = ("rmse", "psnr", "ssim")
METRICS_KEYS = ("names", "judge_weights")
# Fields that never change what a job computes (where and how it runs is recorded, not hashed).
# checkpoint, compile, deterministic: the same values and gradients up to float rounding, like a change
# of device; lbfgs_impl: the same L-BFGS iterates up to float rounding.
NOT_IN_IDENTITY = ("device", "checkpoint", "compile", "deterministic", "lbfgs_impl")
# Fields added after ALGORITHM_VERSION 1, with the value that computes what older versions computed. At
# that value a field is left out of the hash, so adding it does not orphan finished results.
IDENTITY_NEUTRAL: dict[str, Any] = {"lbfgs_history": 100}


@dataclass(frozen=True)
class Pair:
    name: str
    content: Path
    style: Path


@dataclass(frozen=True)
class Setting:
    """One point of the swept axes: a label and the config fields it sets."""

    label: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Job:
    id: str
    pair: Pair
    setting: Setting
    config: StylizeConfig  # resolved

    @property
    def group(self) -> str:
        """Jobs with the same group differ only in their iteration count: one run serves them all."""
        return identity(self.config.replace(iterations=1), self.pair, with_iterations=False)


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    folder: Path
    pairs: tuple[Pair, ...]
    base: Mapping[str, Any]
    settings: tuple[Setting, ...]
    reference: Mapping[str, Any]
    metrics: tuple[str, ...]
    axes: tuple[str, ...] = ()
    smoke: bool = False
    description: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)

    def jobs(self) -> list[Job]:
        out: list[Job] = []
        seen: dict[str, Setting] = {}
        for pair in self.pairs:
            for setting in self.settings:
                cfg = _make_config(self.base, setting)
                job = Job(identity(cfg, pair), pair, setting, cfg)
                if job.id in seen and seen[job.id] is not setting:
                    # E.g. settings that differ only in NOT_IN_IDENTITY fields (device, checkpoint, ...):
                    # one job would silently stand for both.
                    first, fields = seen[job.id].label, ", ".join(NOT_IN_IDENTITY)
                    raise ConfigError(
                        f"{self.path}: settings '{first}' and '{setting.label}' compute the same job (they "
                        f"differ only in {fields}, which do not change results); sweep those separately"
                    )
                seen[job.id] = setting
                out.append(job)
        return out


def identity(cfg: StylizeConfig, pair: Pair, *, with_iterations: bool = True) -> str:
    """A stable id: hash of the resolved config and the *content* of the two input files (not their paths)."""
    data = {
        k: v
        for k, v in cfg.resolved().to_dict().items()
        if k not in NOT_IN_IDENTITY and not (k in IDENTITY_NEUTRAL and v == IDENTITY_NEUTRAL[k])
    }
    if not with_iterations:
        data.pop("iterations")
    payload = {
        "algorithm": ALGORITHM_VERSION + (1 if _affected_by_relu_fix(cfg) else 0),
        "config": data,
        "content": _sha(pair.content),
        "style": _sha(pair.style),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _affected_by_relu_fix(cfg: StylizeConfig) -> bool:
    """Before nstlab 2026-11-27 a requested layer followed by one of torchvision's in-place ReLUs (VGG's
    conv layers, ResNet's bn1) came back already rectified. Configs using such a layer compute something
    else now, so their ids change (and only theirs: the report's layers are all ReLU outputs)."""
    from nstlab.features import get_spec

    resolved = cfg.resolved()
    names = get_spec(cfg.extractor).layer_names()
    after = dict(zip(names, names[1:], strict=False))
    layers = (resolved.content_layers or ()) + (resolved.style_layers or ())
    return any(after.get(layer, "").startswith("relu") for layer in layers)


_SHA_CACHE: dict[tuple[Path, int, int], str] = {}


def _sha(path: Path) -> str:
    # Hash each input once per process, but notice a file that changed since (mtime or size).
    st = path.stat()
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def _make_config(base: Mapping[str, Any], setting: Setting) -> StylizeConfig:
    return StylizeConfig.from_dict({**base, **setting.values}).resolved()


def _did_you_mean(what: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{what}: unknown key {key!r}; valid keys: {', '.join(valid)}.{hint}")


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def expand_axis(name: str, values: Any, where: str) -> list[Setting]:
    """One axis -> its settings. A table value sets several fields; lists inside a table expand."""
    fields = [f.name for f in dataclasses.fields(StylizeConfig)]
    if name not in fields:
        raise _did_you_mean(f"{where} [axes]", name, fields)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where} [axes].{name} must be a non-empty list of values")
    settings: list[Setting] = []
    for value in values:
        if isinstance(value, dict):
            for key in value:
                if key not in fields:
                    raise _did_you_mean(f"{where} [axes].{name} entry", key, fields)
            keys = list(value)
            # Lists inside a table expand (lr = [...]), except for fields whose value is itself a list.
            choices = [
                value[k] if isinstance(value[k], list) and k not in _LIST_FIELDS else [value[k]] for k in keys
            ]
            for combo in itertools.product(*choices):
                values_ = dict(zip(keys, combo, strict=True))
                head = _fmt(values_.get(name, "")) if name in values_ else ""
                rest = " ".join(f"{k}={_fmt(v)}" for k, v in values_.items() if k != name)
                settings.append(Setting(" ".join(p for p in (head, rest) if p), values_))
        else:
            settings.append(Setting(_fmt(value), {name: value}))
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where} [axes].{name} has duplicate settings: {', '.join(labels)}")
    return settings


_LIST_FIELDS = ("losses", "content_layers", "style_layers", "style_layer_weights")


def read_pairs(source: Any, base_dir: Path, where: str) -> list[Pair]:
    rows: list[dict[str, str]]
    root = base_dir
    if isinstance(source, str):
        csv_path = (base_dir / source).resolve()
        if not csv_path.is_file():
            raise InputError(f"{where}: pairs file {csv_path} does not exist")
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark that would join the first name
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows, lines = [], []
                for r in reader:  # DictReader skips blank lines: keep each row's own line number
                    rows.append(r)
                    lines.append(reader.line_num)
                header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{csv_path}: not a readable UTF-8 CSV file ({exc})") from None
        root = csv_path.parent
        if not {"pair", "content", "style"} <= set(header):
            raise ConfigError(
                f"{csv_path} must have the comma-separated columns pair,content,style; its header is "
                f"{','.join(header) or '(empty)'}"
            )
        for number, r in zip(lines, rows, strict=True):
            if any(r.get(k) in (None, "") for k in ("pair", "content", "style")):
                raise ConfigError(f"{csv_path} line {number}: needs a pair, content and style value")
        rows = [{"name": r["pair"], "content": r["content"], "style": r["style"]} for r in rows]
    elif isinstance(source, list):
        rows = source
    else:
        raise ConfigError(f"{where}: pairs must be a CSV path or a list of {{name, content, style}} tables")
    pairs: list[Pair] = []
    for row in rows:
        if not isinstance(row, dict) or not {"name", "content", "style"} <= set(row):
            raise ConfigError(f"{where}: each pair needs name, content and style, got {row!r}")
        for key in row:
            if key not in ("name", "content", "style"):
                raise _did_you_mean(f"{where} pairs", str(key), ("name", "content", "style"))
        if not all(isinstance(row[k], str) for k in ("name", "content", "style")):
            raise ConfigError(f"{where}: a pair's name, content and style must be strings, got {row!r}")
        _check_pair_name(row["name"], where)
        pair = Pair(row["name"], (root / row["content"]).resolve(), (root / row["style"]).resolve())
        for p in (pair.content, pair.style):
            if p.is_dir():
                raise InputError(f"{where}: {pair.name}: {p} is a directory, not an image file")
            if not p.is_file():
                raise InputError(f"{where}: {pair.name}: image {p} does not exist")
        pairs.append(pair)
    if not pairs:
        raise ConfigError(f"{where}: no pairs")
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: duplicate pair names")
    return pairs


def _check_pair_name(name: str, where: str) -> None:
    """A pair's name names its files in the study's folder (images/<pair>/, references/<pair>.png): it
    must be one plain file name, or the study would write outside its folder."""
    bad = (
        not name.strip()
        or name in (".", "..")
        or any(c in name for c in '/\\:*?"<>|')
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        raise ConfigError(
            f"{where}: pair name {name!r} cannot be a file name (it names the pair's images and reference); "
            "use letters, digits, '-', '_' or '.', with no '/'"
        )


def _table(raw: Mapping[str, Any], key: str, where: str, example: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table ({example}), got {value!r}")
    return dict(value)


def _string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{what} must be a list of strings, e.g. ["a", "b"], got {value!r}')
    return value


# --smoke: any study shrunk to seconds, for tests and demos (never mixed with real results: own folder).
SMOKE_BASE = {"size": 64, "weights": "random"}
SMOKE_ITERATION_SCALE = 200  # 1000/1500/2000 -> 5/8/10 evaluations (round half to even: 7.5 -> 8)


def _smoke_iterations(n: Any) -> Any:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return n  # not a count: left for the config's own check to name (e.g. iterations = "x" or 0)
    return max(2, round(n / SMOKE_ITERATION_SCALE))


def reference_options(reference: Mapping[str, Any]) -> ReferenceOptions:
    """The [reference] table's options (everything but the maker); ConfigError when one is invalid."""
    from nstlab.reference import ReferenceOptions

    options = {k: v for k, v in reference.items() if k != "maker"}
    for key in ("adain_weights", "reference_dir"):
        if isinstance(options.get(key), str):  # other types: ReferenceOptions says what it wants
            options[key] = Path(options[key]) if options[key] else None
    return ReferenceOptions(**options)


def maker_name(reference: Mapping[str, Any]) -> str:
    """The [reference] table's maker as the makers are named: "Auto" and " auto" are "auto"."""
    return str(reference.get("maker", "auto")).strip().lower()


def _check_reference(reference: Mapping[str, Any], where: str) -> None:
    """The [reference] table's maker and options, checked now rather than after every job's stylisation."""
    from nstlab.reference import MAKERS

    maker = reference.get("maker", "auto")
    if not isinstance(maker, str) or maker_name(reference) not in MAKERS:
        raise choice_error(f"reference maker in {where} [reference]", str(maker), MAKERS)
    if maker_name(reference) == "folder" and not reference.get("reference_dir"):
        raise ConfigError(f'{where}: [reference] maker = "folder" needs reference_dir = "<folder>"')
    try:
        reference_options(reference)
    except ConfigError as exc:
        raise ConfigError(f"{where} [reference]: {exc}") from None


def load_study(path: str | Path, *, smoke: bool = False) -> Study:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a study file such as {path / 'study.toml'}")
    if not path.is_file():
        raise InputError(f"study file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    for key in raw:
        if key not in TOP_KEYS:
            raise _did_you_mean(where, key, TOP_KEYS)
    if "pairs" not in raw:
        raise ConfigError(f"{where}: 'pairs' is required (a pairs.csv path or a list of tables)")
    name = raw.get("name", path.stem)
    description = raw.get("description", "")
    for key, value in (("name", name), ("description", description), ("output", raw.get("output", ""))):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    pairs = read_pairs(raw["pairs"], path.parent, where)
    if "pair_names" in raw:
        wanted = _string_list(raw["pair_names"], f"{where}: pair_names")
        if not wanted:
            raise ConfigError(
                f"{where}: pair_names is empty; list at least one pair, or leave it out for all"
            )
        known = {p.name: p for p in pairs}
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}: pair_names lists {', '.join(repeated)} more than once")
        for n in wanted:
            if n not in known:
                raise choice_error(f"pair in {where} pair_names", n, list(known))
        pairs = [known[n] for n in wanted]
    base = _table(raw, "base", where, "field = value")
    fields = [f.name for f in dataclasses.fields(StylizeConfig)]
    for key in base:
        if key not in fields:
            raise _did_you_mean(f"{where} [base]", key, fields)
    axes_raw = raw.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{where}: [axes] must be a table of field = [values]")
    per_axis = [expand_axis(k, v, where) for k, v in axes_raw.items()] or [[Setting("base", {})]]
    settings = [
        Setting(" / ".join(s.label for s in combo), {k: v for s in combo for k, v in s.values.items()})
        for combo in itertools.product(*per_axis)
    ]
    if smoke:
        base = {**base, **SMOKE_BASE, "iterations": _smoke_iterations(base.get("iterations", 1000))}
        settings = [
            Setting(s.label, {**s.values, "iterations": _smoke_iterations(s.values["iterations"])})
            if "iterations" in s.values
            else s
            for s in settings
        ]
    reference = _table(raw, "reference", where, 'maker = "auto"') if "reference" in raw else {"maker": "auto"}
    for key in reference:
        if key not in REFERENCE_KEYS:
            raise _did_you_mean(f"{where} [reference]", key, REFERENCE_KEYS)
    for key in ("adain_weights", "reference_dir"):
        # Relative to the study file, as pairs are: the study runs the same from any working directory.
        if isinstance(reference.get(key), str) and reference[key]:
            reference[key] = str((path.parent / Path(reference[key]).expanduser()).resolve())
    _check_reference(reference, where)
    if (
        maker_name(reference) == "folder" and not Path(str(reference["reference_dir"])).is_dir()
    ):  # other makers do not read it
        raise InputError(f"{where} [reference]: reference_dir {reference['reference_dir']} is not a folder")
    if smoke:
        reference["maker"] = "magenta" if maker_name(reference) in ("auto", "adain") else reference["maker"]
    metrics_raw = _table(raw, "metrics", where, 'names = ["rmse", "psnr", "ssim"]')
    for key in metrics_raw:
        if key not in METRICS_KEYS:
            raise _did_you_mean(f"{where} [metrics]", key, METRICS_KEYS)
    metrics = tuple(_string_list(metrics_raw.get("names", list(DEFAULT_METRICS)), f"{where} [metrics].names"))
    if not metrics:
        raise ConfigError(
            f"{where}: [metrics].names is empty; name at least one of {', '.join(METRIC_NAMES)}"
        )
    judge = metrics_raw.get("judge_weights", "torchvision")
    if not isinstance(judge, str) or not judge:
        raise ConfigError(f"{where}: [metrics].judge_weights must be torchvision, random or a file path")
    for m in metrics:
        if m not in METRIC_NAMES:
            raise choice_error(f"metric in {where} [metrics].names", m, METRIC_NAMES)
    folder = (path.parent / str(raw.get("output", path.stem))).resolve()
    if smoke:
        folder = folder / "smoke"
    study = Study(
        name=name,
        path=path.resolve(),
        folder=folder,
        pairs=tuple(pairs),
        base=base,
        settings=tuple(settings),
        reference=reference,
        metrics=metrics,
        axes=tuple(axes_raw),
        smoke=smoke,
        description=description,
        raw=raw,
    )
    study.jobs()  # validate every config now, not halfway through a long run
    return study
