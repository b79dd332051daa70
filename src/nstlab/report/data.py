"""What a report shows, computed once from a study and its store: jobs in study order, table cells
(mean, std, n, what is missing), failure footnotes, provenance and the random-weights flag.

Renderers (tables, figures, HTML, MLflow) only read a :class:`ReportData`; none of them touches the store.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nstlab.errors import ConfigError, NstlabError, choice_error
from nstlab.metrics import TABLE_PSNR, aggregate
from nstlab.study.runner import store_path
from nstlab.study.spec import Job, Pair, Setting, Study
from nstlab.study.store import Store

# metric key in a store row -> (display name, direction arrow, higher is better). The names and arrows are
# those of nstlab.metrics.format_table (a test checks that they agree).
METRICS: dict[str, tuple[str, str, bool]] = {
    "rmse": ("RMSE", "↓", False),
    "psnr": ("PSNR (dB)", "↑", True),
    "ssim": ("SSIM", "↑", True),
    "mse": ("MSE", "↓", False),
    "content_distance": ("content", "↓", False),
    "style_distance": ("style", "↓", False),
    "lpips": ("LPIPS", "↓", False),
}
# Names a study file (or --metrics) may use for a metric key.
METRIC_ALIASES = {"content": "content_distance", "style": "style_distance"}

# Cost rows: store key -> (display name, unit conversion, best direction or None when there is no "better").
COST_ROWS: dict[str, tuple[str, float, bool | None]] = {
    "evaluations": ("evaluations", 1.0, None),
    "wall_time_s": ("wall time (s)", 1.0, False),
    "peak_memory_bytes": ("peak memory (MiB)", 1.0 / 2**20, False),
}
# The name of a row in CSV files (metric keys as in the store; cost rows with their unit).
CSV_NAMES = {"peak_memory_bytes": "peak_memory_mib"}

MISSING = "—"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def metric_key(name: str) -> str:
    """A metric name as written in a study file or on the command line -> its key in the store's rows."""
    key = METRIC_ALIASES.get(name, name)
    if key not in METRICS:
        raise choice_error("metric", name, list(METRICS) + list(METRIC_ALIASES))
    return key


def format_value(key: str, value: float) -> str:
    """Display precision per metric: PSNR 2 decimals, SSIM 4, others 4 significant digits."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if key == "psnr":
        return f"{value:.2f}"
    if key == "ssim":
        return f"{value:.4f}"
    if key == "evaluations":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if key == "wall_time_s":
        return f"{value:.2f}"
    if key == "peak_memory_bytes":
        return f"{value:.0f}"
    # "#" keeps trailing zeros (0.3550 beside 0.3474, both 4 significant digits); a bare "1000." loses its dot
    return f"{value:#.4g}".replace(".e", "e").rstrip(".")


def format_std(key: str, value: float) -> str:
    """A standard deviation: like the mean for PSNR, SSIM and cost; otherwise 2 significant digits."""
    if key in ("psnr", "ssim", "wall_time_s", "peak_memory_bytes", "evaluations") or math.isinf(value):
        return format_value(key, value)
    return f"{value:.2g}"


@dataclass
class JobView:
    """One (pair, setting) job with its store row (None before the study was ever run)."""

    job: Job
    row: dict[str, Any] | None
    record: dict[str, Any] | None = None
    footnote: int | None = None  # number of the footnote with the failure reason

    @property
    def status(self) -> str:
        return str(self.row["status"]) if self.row else "pending"

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def error(self) -> str:
        return str(self.row.get("error") or "unknown reason") if self.row else ""

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.row.get("metrics") or {}) if self.row else {}

    @property
    def random_weights(self) -> bool:
        """Its extractor (or metrics judge) had random weights: by config, run record or metrics flag."""
        rec_random = bool(self.record and (self.record.get("weights") or {}).get("random"))
        judge_random = self.metrics.get("judge_random_weights") is True
        return self.job.config.weights == "random" or rec_random or judge_random


@dataclass
class Cell:
    """One table cell: the mean over the done jobs it covers, and what it is missing."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    expected: int = 1
    pending: int = 0  # pending or running
    failed: list[int] = field(default_factory=list)  # footnote numbers of the failed jobs
    not_computed: int = 0  # done jobs without this metric
    best: bool = False

    @property
    def partial(self) -> bool:
        return self.mean is not None and self.n < self.expected

    def notes(self) -> list[str]:
        """Plain-text notes on what is missing, e.g. ``["n=1/2", "1 pending", "failed [1]"]``."""
        out: list[str] = []
        if self.partial:
            out.append(f"n={self.n}/{self.expected}")
        if self.pending:
            out.append("pending" if self.expected == 1 else f"{self.pending} pending")
        if self.failed:
            refs = ",".join(str(f) for f in self.failed)
            out.append(f"failed [{refs}]" if self.expected == 1 else f"{len(self.failed)} failed [{refs}]")
        if self.not_computed and self.mean is None and not self.pending and not self.failed:
            out.append("not computed")
        return out


@dataclass
class TableRow:
    key: str
    name: str
    arrow: str  # "↑", "↓" or ""
    cells: list[Cell]

    @property
    def label(self) -> str:
        return f"{self.name} {self.arrow}".strip()


@dataclass
class Table:
    """Rows are metrics (or cost quantities), columns are the study's settings in study order."""

    id: str  # file stem / HTML anchor: "summary", "cost", "pair-<name>"
    title: str
    columns: list[str]
    rows: list[TableRow]
    notes: list[str]
    std: bool = False


@dataclass
class Footnote:
    number: int
    pair: str
    setting: str
    reason: str


@dataclass
class ReportData:
    study: Study
    jobs: list[JobView]  # study order: pair-major, then setting
    metric_keys: list[str]
    std: bool
    store_found: bool
    footnotes: list[Footnote]
    stale_rows: int  # rows in the store that belong to no job of the study as it is now

    def job(self, pair: Pair | str, setting: Setting | str) -> JobView:
        p = pair if isinstance(pair, str) else pair.name
        s = setting if isinstance(setting, str) else setting.label
        return self._index[(p, s)]

    def __post_init__(self) -> None:
        self._index = {(j.job.pair.name, j.job.setting.label): j for j in self.jobs}

    @property
    def settings(self) -> tuple[Setting, ...]:
        return self.study.settings

    @property
    def pairs(self) -> tuple[Pair, ...]:
        return self.study.pairs

    @property
    def counts(self) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
        for j in self.jobs:
            counts[j.status if j.status in counts else "pending"] += 1
        return counts

    @property
    def any_done(self) -> bool:
        return any(j.done for j in self.jobs)

    def stale_rows_note(self) -> str | None:
        n = self.stale_rows
        if not n:
            return None
        return (
            f"{plural(n, 'row')} in the store {'belongs' if n == 1 else 'belong'} to an earlier version of "
            f"the study file and {'is' if n == 1 else 'are'} not shown."
        )

    # --- pseudo ground truths from more than one maker -----------------------------------------------

    def pairs_by_reference_maker(self) -> dict[str, list[str]]:
        """{maker: pair names} of the done jobs' references. More than one maker happens with maker = "auto"
        when some references were made where AdaIN's weights could be had and others where they could not
        (Magenta): their scores measure distances to different targets and do not average together."""
        makers: dict[str, set[str]] = {}
        for j in self.jobs:
            ref = j.row.get("reference") if j.done and j.row else None
            if isinstance(ref, dict) and ref.get("maker"):
                makers.setdefault(str(ref["maker"]), set()).add(j.job.pair.name)
        return {m: sorted(p) for m, p in sorted(makers.items())}

    def mixed_references_note(self) -> str | None:
        makers = self.pairs_by_reference_maker()
        if len(makers) < 2:
            return None
        which = "; ".join(f"{m}: {', '.join(p)}" for m, p in makers.items())
        return (
            f"Pseudo ground truths come from {len(makers)} makers ({which}), so the reference metrics of "
            "these pairs are distances to different targets and their means mix them. Name one maker in "
            '[reference] (e.g. maker = "adain" with its weights available) and run the study into a new '
            "output folder."
        )

    # --- random weights -------------------------------------------------------------------------------

    def random_weight_jobs(self) -> list[JobView]:
        """Jobs whose extractor (or metrics judge) had random weights, by config, record or metrics."""
        return [j for j in self.jobs if j.random_weights]

    @property
    def random_weights(self) -> bool:
        return self.study.smoke or bool(self.random_weight_jobs())

    # --- tables ---------------------------------------------------------------------------------------

    def _cell(self, jobs: Sequence[JobView], key: str) -> Cell:
        cell = Cell(expected=len(jobs))
        values: list[dict[str, float]] = []
        for j in jobs:
            if j.done:
                v = j.metrics.get(key) if key in METRICS else j.row.get(key) if j.row else None
                if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v):
                    values.append({key: float(v)})
                else:
                    cell.not_computed += 1
            elif j.status == "failed":
                if j.footnote is not None:
                    cell.failed.append(j.footnote)
            else:
                cell.pending += 1
        if values:
            agg = aggregate(values)[key]
            scale = COST_ROWS[key][1] if key in COST_ROWS else 1.0
            cell.mean, cell.std, cell.n = agg["mean"] * scale, agg["std"] * scale, int(agg["n"])
        return cell

    def _table_rows(self, keys: Sequence[str], jobs_of: Sequence[Sequence[JobView]]) -> list[TableRow]:
        rows = []
        for key in keys:
            if key in METRICS:
                name, arrow, higher = METRICS[key]
                direction: bool | None = higher
            else:
                name, _, direction = COST_ROWS[key]
                arrow = "" if direction is None else ("↑" if direction else "↓")
            cells = [self._cell(jobs, key) for jobs in jobs_of]
            mark_best(cells, direction)
            rows.append(TableRow(key, name, arrow, cells))
        return rows

    def _column_jobs(self, pairs: Sequence[Pair]) -> list[list[JobView]]:
        return [[self.job(p, s) for p in pairs] for s in self.settings]

    def summary_table(self) -> Table:
        n_pairs = len(self.pairs)
        notes = [
            f"Each cell is the mean over the {plural(n_pairs, 'pair')} of the study "
            f"(n = {n_pairs} per cell unless the cell says n=k/{n_pairs})"
            + (", ± the sample standard deviation (ddof = 1) over pairs" if self.std else "")
            + ".",
            "PSNR is the mean of the per-image PSNRs "
            f"(TABLE_PSNR = {TABLE_PSNR}), not the PSNR of the mean MSE.",
            "↑: higher is better, ↓: lower is better; the best value of each row is in bold "
            "(only where two or more settings have a value).",
        ]
        if self.study.smoke:
            notes.append(
                "Smoke study: 64 px, random weights, iteration counts scaled down; setting labels keep the "
                "full study's values (the cost table shows the evaluations actually run)."
            )
        return Table(
            "summary",
            "Metrics per setting (mean over pairs)",
            [s.label for s in self.settings],
            self._table_rows(self.metric_keys, self._column_jobs(self.pairs)),
            notes + self._missing_notes(),
            std=self.std,
        )

    def pair_tables(self) -> list[Table]:
        out = []
        for pair in self.pairs:
            out.append(
                Table(
                    f"pair-{pair.name}",
                    f"Pair {pair.name}",
                    [s.label for s in self.settings],
                    self._table_rows(self.metric_keys, self._column_jobs([pair])),
                    [
                        f"One job per cell (n = 1): the metrics of {pair.name}'s output for each setting; "
                        "the best value of each row is in bold."
                    ],
                )
            )
        return out

    def cost_table(self) -> Table:
        kinds = sorted(
            {
                str((j.record.get("run") or {}).get("peak_memory_kind"))
                for j in self.jobs
                if j.done and j.record and (j.record.get("run") or {}).get("peak_memory_kind")
            }
        )
        devices = sorted({str(j.record.get("device")) for j in self.jobs if j.done and j.record})
        notes = [
            "Mean over the done jobs of each setting. Evaluations: objective evaluations (forward + "
            "backward). Wall time: optimisation only; jobs that differ only in their iteration count share "
            "one run, and each is charged its share (k / longest run). Peak memory: "
            + (", ".join(kinds) if kinds else "as recorded")
            + (f" on {', '.join(devices)}" if devices else "")
            + "."
        ]
        return Table(
            "cost",
            "Cost per setting (mean over pairs)",
            [s.label for s in self.settings],
            self._table_rows(list(COST_ROWS), self._column_jobs(self.pairs)),
            notes,
            std=self.std,
        )

    def _missing_notes(self) -> list[str]:
        c = self.counts
        if c["done"] == len(self.jobs):
            return []
        return [
            f"Partial study: {c['done']}/{len(self.jobs)} jobs done, {c['running']} running, "
            f"{c['failed']} failed, {c['pending']} pending; {MISSING} marks a cell with no finished job."
        ]

    # --- provenance -----------------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        from nstlab import __version__

        versions: dict[str, set[str]] = {}
        weights: set[str] = set()
        devices: set[str] = set()
        for j in self.jobs:
            if not j.record:
                continue
            for k, v in (j.record.get("versions") or {}).items():
                versions.setdefault(k, set()).add(str(v))
            w = j.record.get("weights") or {}
            if w:
                weights.add(
                    f"{w.get('identifier') or w.get('source')}" + (" (RANDOM)" if w.get("random") else "")
                )
            if j.record.get("device"):
                devices.add(str(j.record["device"]))
        makers = sorted(
            {
                str(ref.get("label") or ref.get("maker"))
                for j in self.jobs
                if j.row and isinstance(ref := j.row.get("reference"), dict)
            }
        )
        judge = sorted(
            {
                "random (test only)" if j.metrics.get("judge_random_weights") else "pretrained"
                for j in self.jobs
                if j.metrics.get("judge_random_weights") is not None
            }
        )
        return {
            "report made by": f"nstlab {__version__}",
            "study file": str(self.study.path),
            "results folder": str(self.study.folder),
            "smoke": self.study.smoke,
            "weights": sorted(weights) or sorted({j.job.config.weights for j in self.jobs}),
            "reference makers": makers or [str(self.study.reference.get("maker", "auto")) + " (requested)"],
            "judge weights": judge or ["not used"],
            "devices": sorted(devices),
            "versions": {k: sorted(v) for k, v in sorted(versions.items())},
        }

    def resolved_config(self) -> dict[str, Any]:
        """The study as it resolves now: base, each setting's full config, pairs, reference, metrics."""
        first = {s.label: self.job(self.pairs[0], s).job.config.to_dict() for s in self.settings}
        return {
            "name": self.study.name,
            "description": self.study.description,
            "smoke": self.study.smoke,
            "axes": list(self.study.axes),
            "base": dict(self.study.base),
            "settings": {
                s.label: {"values": dict(s.values), "resolved": first[s.label]} for s in self.settings
            },
            "pairs": [{"name": p.name, "content": str(p.content), "style": str(p.style)} for p in self.pairs],
            "reference": dict(self.study.reference),
            "metrics": list(self.study.metrics),
        }


def mark_best(cells: Sequence[Cell], higher: bool | None) -> None:
    """Mark the best mean (max when ``higher``, min otherwise; ties all marked). Nothing is marked when
    there is no direction or fewer than two cells have a value."""
    values = [c.mean for c in cells if c.mean is not None and not math.isnan(c.mean)]
    if higher is None or len(values) < 2:
        return
    best = max(values) if higher else min(values)
    for c in cells:
        c.best = c.mean is not None and c.mean == best


def _load_record(folder: Path, row: Mapping[str, Any]) -> dict[str, Any] | None:
    rel = row.get("record")
    if not rel:
        return None
    try:
        data = json.loads((folder / str(rel)).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect(study: Study, metrics: Sequence[str] | None = None, std: bool = False) -> ReportData:
    """Read the study's store (without creating one) and its run records."""
    keys = [metric_key(m) for m in (metrics if metrics is not None else study.metrics)]
    if not keys:
        raise ConfigError("no metrics to report; give --metrics rmse,psnr,ssim or set [metrics].names")
    keys = list(dict.fromkeys(keys))
    jobs = study.jobs()
    rows: dict[str, dict[str, Any]] = {}
    path = store_path(study)
    stale = 0
    if path.is_file():
        try:
            store = Store(path)
            try:
                all_rows = store.rows()
            finally:
                store.close()
        except sqlite3.Error as exc:
            raise NstlabError(f"cannot read the study's store {path}: {exc}") from None
        wanted = {j.id for j in jobs}
        rows = {r["id"]: r for r in all_rows if r["id"] in wanted}
        stale = len(all_rows) - len(rows)
    views = [JobView(j, rows.get(j.id)) for j in jobs]
    footnotes: list[Footnote] = []
    for v in views:
        if v.row is not None and v.done:
            v.record = _load_record(study.folder, v.row)
        elif v.status == "failed":
            v.footnote = len(footnotes) + 1
            footnotes.append(Footnote(v.footnote, v.job.pair.name, v.job.setting.label, v.error))
            if v.row is not None:
                v.record = _load_record(study.folder, v.row)
    return ReportData(study, views, keys, std, path.is_file(), footnotes, stale)
