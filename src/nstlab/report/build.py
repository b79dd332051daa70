"""``build_report``: every table, figure and page of a study's report, written atomically to one folder.

Files (``formats`` chooses the table/page formats; figures, under ``figures/``, are written whatever the
formats, unless ``figures=False``):

=========  ==============================================================================================
md         ``report.md``: all tables, failure notes, links to the figures
csv        ``summary.csv``, ``per_pair.csv``, ``cost.csv`` (report shape, ``best`` column) and ``jobs.csv``
           (one row per job: status, error, every metric, cost; for re-analysis)
latex      ``summary.tex``, ``per_pair.tex``, ``cost.tex``: booktabs ``table`` environments to ``\\input``
html       ``index.html``: self-contained page with tables, figures, config and provenance
=========  ==============================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nstlab.errors import ConfigError, choice_error
from nstlab.images import write_text_atomic
from nstlab.report.data import METRICS, ReportData, Table, collect, plural
from nstlab.report.figures import Figures, all_figures
from nstlab.report.page import render_page
from nstlab.report.tables import (
    footnotes_markdown,
    md_escape,
    table_csv,
    table_latex,
    table_markdown,
    write_csv_text,
)
from nstlab.study.spec import Study

FORMATS = ("md", "csv", "latex", "html")


def default_out_dir(study: Study) -> Path:
    return study.folder / "report"


def parse_formats(formats: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for f in formats:
        name = {"tex": "latex", "markdown": "md"}.get(f.strip().lower(), f.strip().lower())
        if name not in FORMATS:
            raise choice_error("report format", f, FORMATS)
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no report format given; choose from {', '.join(FORMATS)}")
    return tuple(out)


def _markdown(data: ReportData, tables: Sequence[Table], figures: Figures, out_dir: Path) -> str:
    study = data.study
    c = data.counts
    lines = [f"# Study report: {md_escape(study.name)}{' (smoke)' if study.smoke else ''}", ""]
    if study.description:
        lines += [md_escape(study.description), ""]
    if data.random_weights:
        lines += [
            "> **⚠ RANDOM WEIGHTS — these are not real results.** Jobs of this study used an "
            "untrained, randomly initialised feature extractor (smoke / test run); the images and numbers "
            "only show that the pipeline runs.",
            "",
        ]
    mixed = data.mixed_references_note()
    if mixed:
        lines += [f"> **⚠ Mixed references.** {md_escape(mixed)}", ""]
    lines += [
        f"{plural(len(data.pairs), 'pair')} × {plural(len(data.settings), 'setting')}"
        + (f" (axes: {', '.join(study.axes)})" if study.axes else "")
        + f"; jobs: {c['done']} done, {c['running']} running, {c['failed']} failed, {c['pending']} pending."
        + (f" {data.stale_rows_note()}" if data.stale_rows else ""),
        "",
    ]
    if not data.any_done:
        lines += [
            f"**Nothing is done yet** (0 of {len(data.jobs)} jobs). Run `nstlab study run "
            f"{study.path.name}{' --smoke' if study.smoke else ''}` and make this report again.",
            "",
        ]
    summary, cost, *pairs = tables
    lines += [table_markdown(summary, "##"), table_markdown(cost, "##"), "## Per pair", ""]
    lines += [table_markdown(t, "###") for t in pairs]
    if data.footnotes:
        lines.append(footnotes_markdown(data.footnotes))
    lines += ["## Figures", ""]
    if figures.skipped:
        lines += ["Figures were not made for this report (--no-figures).", ""]
    for caption, paths in figures.grid:
        png = next(p for p in paths if p.suffix == ".png")
        lines += [
            f"![{md_escape(caption)}]({png.relative_to(out_dir).as_posix()})",
            "",
            md_escape(caption),
            "",
        ]
    if figures.loss:
        lines += [
            f"![loss curves]({figures.loss[0].relative_to(out_dir).as_posix()})",
            "",
            "Loss per evaluation (total and each weighted term), mean over the done pairs, log scale.",
            "",
        ]
    if figures.iterations:
        lines += [f"![metrics vs iterations]({figures.iterations[0].relative_to(out_dir).as_posix()})", ""]
    prov = data.provenance()
    lines += ["## Provenance", ""]
    for key, value in prov.items():
        if key == "versions":
            value = "; ".join(f"{k} {', '.join(v)}" for k, v in value.items()) or "no records yet"
        elif isinstance(value, list):
            value = "; ".join(map(str, value)) or "—"
        lines.append(f"- {key}: {md_escape(str(value))}")
    return "\n".join(lines).rstrip() + "\n"


def _jobs_csv(data: ReportData) -> str:
    metric_cols = list(METRICS)
    extra = sorted(
        {k for j in data.jobs for k, v in j.metrics.items() if k not in METRICS and not isinstance(v, bool)}
    )
    header = [
        "pair",
        "setting",
        "job_id",
        "status",
        "error",
        *metric_cols,
        *extra,
        "evaluations",
        "wall_time_s",
        "peak_memory_bytes",
        "output",
        "reference_maker",
    ]
    rows: list[list[str]] = [header]
    for j in data.jobs:
        row = j.row or {}
        ref = row.get("reference") if isinstance(row.get("reference"), dict) else {}
        m = j.metrics

        def cell(v: Any) -> str:
            return "" if v is None else repr(v) if isinstance(v, float) else str(v)

        rows.append(
            [
                j.job.pair.name,
                j.job.setting.label,
                j.job.id,
                j.status,
                j.error if j.status == "failed" else "",
                *(cell(m.get(k)) for k in metric_cols),
                *(cell(m.get(k)) for k in extra),
                cell(row.get("evaluations")),
                cell(row.get("wall_time_s")),
                cell(row.get("peak_memory_bytes")),
                cell(row.get("output")),
                cell((ref or {}).get("maker")),
            ]
        )
    return write_csv_text(rows)


def _latex_prefix(study: Study) -> str:
    return "tab:" + re.sub(r"[^A-Za-z0-9-]", "-", study.name) + ("-smoke" if study.smoke else "")


def _latex_header(data: ReportData, what: str) -> str:
    warn = (
        "% WARNING: RANDOM WEIGHTS (smoke/test run): these numbers are not real results.\n"
        if data.random_weights
        else ""
    )
    return (
        f"% nstlab report: {what} of study {data.study.name!r}. Needs \\usepackage{{booktabs}}.\n"
        f"% PSNR is the mean of per-image PSNR; n per cell as stated in the caption.\n{warn}"
    )


def build_report(
    study: Study,
    out_dir: str | Path | None = None,
    formats: Iterable[str] = FORMATS,
    metrics: Sequence[str] | None = None,
    std: bool = False,
    *,
    figures: bool = True,
) -> Path:
    """Write the report of ``study`` (done, partial or not yet run) and return its folder.

    ``out_dir`` defaults to ``<study.folder>/report``; ``formats`` is any of md, csv, latex, html;
    ``metrics`` defaults to the study's ``[metrics].names`` (names as in a study file: rmse, psnr, ssim,
    mse, content, style, lpips); ``std`` adds ± the standard deviation over pairs; ``figures=False`` skips
    the figures (tables only, and the page and Markdown then show none).
    """
    fmts = parse_formats(formats)
    return write_report(collect(study, metrics, std), out_dir, fmts, figures=figures)


def write_report(
    data: ReportData,
    out_dir: str | Path | None = None,
    formats: Iterable[str] = FORMATS,
    *,
    figures: bool = True,
) -> Path:
    """:func:`build_report` for data already collected (:func:`nstlab.report.collect`)."""
    fmts = parse_formats(formats)
    study = data.study
    out = Path(out_dir) if out_dir is not None else default_out_dir(study)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report folder {out} exists and is not a folder")
    tables = [data.summary_table(), data.cost_table(), *data.pair_tables()]
    summary, cost, *pairs = tables
    figs = all_figures(data, out / "figures") if figures else Figures(skipped=True)
    written: list[Path] = []
    if "csv" in fmts:
        per_pair: list[list[str]] = []
        for i, (pair, t) in enumerate(zip(data.pairs, pairs, strict=True)):
            per_pair += table_csv(t, pair=pair.name, header=i == 0)
        written += [
            write_text_atomic(out / "summary.csv", write_csv_text(table_csv(summary))),
            write_text_atomic(out / "per_pair.csv", write_csv_text(per_pair)),
            write_text_atomic(out / "cost.csv", write_csv_text(table_csv(cost))),
            write_text_atomic(out / "jobs.csv", _jobs_csv(data)),
        ]
    if "latex" in fmts:
        prefix = _latex_prefix(study)
        written += [
            write_text_atomic(
                out / "summary.tex",
                _latex_header(data, "summary") + table_latex(summary, prefix, data.footnotes),
            ),
            write_text_atomic(
                out / "per_pair.tex",
                _latex_header(data, "per-pair tables")
                + "\n".join(table_latex(t, prefix, data.footnotes) for t in pairs),
            ),
            write_text_atomic(
                out / "cost.tex", _latex_header(data, "cost") + table_latex(cost, prefix, data.footnotes)
            ),
        ]
    if "md" in fmts:
        written.append(write_text_atomic(out / "report.md", _markdown(data, tables, figs, out)))
    if "html" in fmts:
        write_text_atomic(out / "index.html", render_page(data, tables, figs, out, written))
    return out
