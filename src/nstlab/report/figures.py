"""Figures (matplotlib, Agg canvas, no pyplot state): image grid, loss curves, metric vs iterations.

Each figure is written twice, atomically: ``NAME.png`` and ``NAME.svg``.

* ``grid.png`` (``grid-2.png``, … when a study has more than :data:`GRID_MAX_ROWS` pairs): rows are pairs;
  columns are content, style, the reference (pseudo ground truth), then each setting's output. A missing
  output is a grey box saying "pending" or "failed [k]".
* ``loss_curves.png``: one subplot per loss term (total first, then each *weighted* term as recorded in the
  trace: content, style, tv, range; a term that is never positive is left out), one line per setting, log
  y. Each line is the **mean over the pairs** whose job is done, evaluation by evaluation, up to the
  shortest of their traces (so every point averages the same pairs).
* ``metrics_vs_iterations.png`` (only when ``iterations`` is a swept axis): mean ± std over pairs of each
  metric against the iteration count, one line per combination of the other axes.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nstlab.errors import ConfigError
from nstlab.report.data import METRICS, ReportData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

GRID_MAX_ROWS = 8
CELL_IN = 1.9  # inches per grid cell
DPI = 150
THUMB_PX = int(CELL_IN * DPI)  # images are downscaled to this before plotting (keeps the SVG small)
TERMS = ("total", "content", "style", "tv", "range")
RANDOM_NOTE = "RANDOM WEIGHTS: smoke-test outputs, not real style transfer results"


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("report figures need matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    import matplotlib

    out = []
    # A fixed hash salt and no date: re-running the report on the same results gives the same SVG.
    with matplotlib.rc_context({"svg.hashsalt": "nstlab", "svg.fonttype": "path"}):
        for fmt in ("png", "svg"):
            buf = io.BytesIO()
            meta: dict[str, Any] = {"Software": "nstlab report"}
            if fmt == "svg":
                meta = {"Date": None, "Creator": "nstlab report"}
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
            # The layout is solved by the first save; freezing it halves the cost of the second.
            fig.set_layout_engine("none")
            path = folder / f"{stem}.{fmt}"
            write_bytes_atomic(path, buf.getvalue())
            out.append(path)
    return out


def plain(text: str) -> str:
    """Text shown as written: matplotlib would read "$...$" in a label (e.g. a pair name) as math."""
    return text.replace("$", r"\$")


def _suptitle(fig: Figure, data: ReportData, title: str) -> None:
    fig.suptitle(plain(title), fontsize=11)
    if data.random_weights:
        fig.supxlabel(RANDOM_NOTE, color="#b00020", fontsize=9, weight="bold")


# --- image grid -----------------------------------------------------------------------------------------


def _thumb(path: Path) -> Image.Image | None:
    from nstlab.images import load_image

    try:
        img = load_image(path)
    except Exception:  # noqa: BLE001 - a missing or broken file becomes an empty cell, never a crash
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def _image_cell(ax: Axes, img: Image.Image | None, note: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(img is None)
        spine.set_color("#bbbbbb")
    if img is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="#666666", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    else:
        # "antialiased": nearest neighbour when enlarging a small output (its pixels are shown as they are),
        # smooth resampling when shrinking.
        ax.imshow(np.asarray(img), interpolation="antialiased")
        # Keep every cell's box the same size (aligned titles and labels); the image is centred inside it.
        ax.set_adjustable("datalim")


def _wrap(text: str, width: int = 18) -> str:
    return plain("\n".join(textwrap.wrap(text, width)) or text)


def grid_figures(data: ReportData, folder: Path) -> list[tuple[str, list[Path]]]:
    """Write the image grid(s); returns (caption, [png, svg]) per page."""
    pairs = list(data.pairs)
    pages = [pairs[i : i + GRID_MAX_ROWS] for i in range(0, len(pairs), GRID_MAX_ROWS)]
    heads = ["content", "style", "reference"] + [s.label for s in data.settings]
    out = []
    for page_no, page in enumerate(pages, 1):
        ncols = len(heads)
        fig = _figure(CELL_IN * ncols + 0.4, CELL_IN * len(page) + 0.9)
        axes = fig.subplots(len(page), ncols, squeeze=False)
        for r, pair in enumerate(page):
            views = [data.job(pair, s) for s in data.settings]
            ref_rel = next(
                (
                    v.row["reference"]["path"]
                    for v in views
                    if v.row and isinstance(v.row.get("reference"), dict) and v.row["reference"].get("path")
                ),
                None,
            )
            cells: list[tuple[Image.Image | None, str]] = [
                (_thumb(pair.content), "missing"),
                (_thumb(pair.style), "missing"),
                (_thumb(data.study.folder / ref_rel) if ref_rel else None, "no reference yet"),
            ]
            for v in views:
                if v.done and v.row and v.row.get("output"):
                    cells.append((_thumb(data.study.folder / str(v.row["output"])), "missing file"))
                elif v.status == "failed":
                    cells.append((None, f"failed [{v.footnote}]"))
                else:
                    cells.append((None, v.status))
            for c, (img, note) in enumerate(cells):
                ax = axes[r][c]
                _image_cell(ax, img, note)
                if r == 0:
                    ax.set_title(_wrap(heads[c]), fontsize=9)
                if c == 0:
                    ax.set_ylabel(_wrap(pair.name, 16), fontsize=9)
        suffix = f" ({page_no}/{len(pages)})" if len(pages) > 1 else ""
        _suptitle(fig, data, f"{data.study.name}: outputs per pair and setting{suffix}")
        stem = "grid" if page_no == 1 else f"grid-{page_no}"
        caption = (
            f"Rows: pairs {page[0].name} … {page[-1].name}; columns: content, style, reference "
            "(pseudo ground truth), then each setting's output."
        )
        out.append((caption, save_figure(fig, folder, stem)))
    return out


# --- loss curves ----------------------------------------------------------------------------------------


def mean_curves(data: ReportData) -> dict[str, dict[str, np.ndarray]]:
    """term -> setting label -> mean over done pairs of the term's trace, up to the shortest trace."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for setting in data.settings:
        traces = [
            v.record["trace"]
            for p in data.pairs
            if (v := data.job(p, setting)).done and v.record and isinstance(v.record.get("trace"), list)
        ]
        traces = [t for t in traces if t]
        if not traces:
            continue
        length = min(len(t) for t in traces)
        for term in TERMS:
            if not all(term in step for t in traces for step in t[:length]):
                continue
            values = np.array([[float(step[term]) for step in t[:length]] for t in traces], dtype=np.float64)
            out.setdefault(term, {})[setting.label] = values.mean(axis=0)
    return {t: curves for t, curves in out.items() if any(np.any(c > 0) for c in curves.values())}


def loss_figure(data: ReportData, folder: Path) -> list[Path] | None:
    from matplotlib.ticker import MaxNLocator

    curves = mean_curves(data)
    if not curves:
        return None
    terms = [t for t in TERMS if t in curves]
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    labels = [s.label for s in data.settings]
    colors = _colors(len(labels))
    for i, term in enumerate(terms):
        ax = axes[i // ncols][i % ncols]
        for label, color in zip(labels, colors, strict=True):
            y = curves[term].get(label)
            if y is None:
                continue
            y = np.where(y > 0, y, np.nan)  # log axis: zeros (e.g. content at evaluation 1) are not drawn
            ax.plot(np.arange(1, len(y) + 1), y, label=plain(label), color=color, linewidth=1.4)
        ax.set_yscale("log")
        ax.set_title(term if term == "total" else f"{term} (weighted)", fontsize=10)
        ax.set_xlabel("evaluation", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.25)
        ax.tick_params(which="both", labelsize=8)
    for j in range(len(terms), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="outside right upper", fontsize=8, title="setting")
    _suptitle(fig, data, f"{data.study.name}: loss per evaluation (mean over done pairs, log scale)")
    return save_figure(fig, folder, "loss_curves")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


# --- metric vs iterations -------------------------------------------------------------------------------


def iteration_series(data: ReportData, key: str) -> dict[str, list[tuple[int, float, float, int]]]:
    """Line label (the other axes' values) -> [(iterations, mean, std, n)] sorted by iterations."""
    lines: dict[str, list[tuple[int, float, float, int]]] = {}
    row = {r.key: r for r in data.summary_table().rows}.get(key)
    if row is None:
        return lines
    for setting, cell in zip(data.settings, row.cells, strict=True):
        if cell.mean is None:
            continue
        cfg = data.job(data.pairs[0], setting).job.config
        others = " ".join(f"{k}={v}" for k, v in setting.values.items() if k != "iterations")
        lines.setdefault(others or "all", []).append((cfg.iterations, cell.mean, cell.std or 0.0, cell.n))
    return {k: sorted(v) for k, v in lines.items()}


def iterations_figure(data: ReportData, folder: Path) -> list[Path] | None:
    if "iterations" not in data.study.axes or not data.any_done:
        return None
    keys = [k for k in data.metric_keys if iteration_series(data, k)]
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.0 * ncols, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        series = iteration_series(data, key)
        for (label, points), color in zip(series.items(), _colors(len(series)), strict=True):
            x = [p[0] for p in points]
            y = [p[1] for p in points]
            err = [p[2] for p in points]
            ax.errorbar(x, y, yerr=err, label=plain(label), color=color, marker="o", capsize=3, linewidth=1.4)
        name, arrow, _ = METRICS[key]
        ax.set_title(f"{name} {arrow}", fontsize=10)
        ax.set_xlabel("iterations (objective evaluations)", fontsize=9)
        ax.set_xticks(sorted({p[0] for points in series.values() for p in points}))
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelsize=8)
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    _suptitle(fig, data, f"{data.study.name}: metrics vs iterations (mean ± std over pairs)")
    return save_figure(fig, folder, "metrics_vs_iterations")


@dataclass
class Figures:
    """What was written: grid pages (caption, [png, svg]) and the optional curve figures ([png, svg])."""

    grid: list[tuple[str, list[Path]]] = field(default_factory=list)
    loss: list[Path] | None = None
    iterations: list[Path] | None = None
    skipped: bool = False  # figures=False / --no-figures

    def paths(self) -> list[Path]:
        return [p for _, ps in self.grid for p in ps] + (self.loss or []) + (self.iterations or [])


FIGURE_PATTERNS = ("grid.*", "grid-*.*", "loss_curves.*", "metrics_vs_iterations.*")


def all_figures(data: ReportData, folder: Path) -> Figures:
    """Write every figure that applies to ``folder``, and remove figures of an earlier report that no longer
    apply (e.g. a grid page for pairs that are gone), so the folder never shows stale results."""
    figures = Figures(grid_figures(data, folder), loss_figure(data, folder), iterations_figure(data, folder))
    keep = set(figures.paths())
    for pattern in FIGURE_PATTERNS:
        for old in folder.glob(pattern):
            if old.suffix in (".png", ".svg") and old not in keep:
                old.unlink(missing_ok=True)
    return figures
