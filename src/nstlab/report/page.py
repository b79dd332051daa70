"""``report/index.html``: one self-contained page (inline CSS, no scripts, no network, relative links).

Figures open full size in a CSS-only lightbox (``:target``) and also link to the PNG and SVG files.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections.abc import Sequence
from pathlib import Path

from nstlab.report.data import ReportData, Table, plural
from nstlab.report.figures import Figures
from nstlab.report.tables import table_html

CSS = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #d9d9de; --accent: #2357b5; --bad: #b00020; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; font-size: 26px; }
h2 { margin-top: 36px; border-bottom: 1px solid var(--line); padding-bottom: 4px; font-size: 20px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0 0 12px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.banner { background: var(--bad); color: #fff; padding: 14px 18px; border-radius: 6px; margin: 16px 0;
          font-weight: 600; font-size: 16px; }
.banner small { display: block; font-weight: 400; font-size: 14px; margin-top: 4px; }
.notice { background: #fff6d6; border: 1px solid #e6c200; padding: 12px 16px; border-radius: 6px; }
.counts span { display: inline-block; padding: 2px 10px; margin-right: 6px; border-radius: 12px;
               background: #eef1f6; font-size: 13px; }
.counts .failed { background: #fde2e6; color: var(--bad); }
.counts .done { background: #e2f5e6; color: #176b2c; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 4px; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); }
thead th { border-bottom: 2px solid var(--fg); text-align: right; }
thead th:first-child, tbody th { text-align: left; font-weight: 500; white-space: nowrap; }
td { text-align: right; white-space: nowrap; }
td.best strong { color: #0b5d1e; }
td.missing { color: var(--muted); }
.note { color: var(--muted); font-size: 12px; }
p.caption { color: var(--muted); font-size: 13px; margin: 2px 0; max-width: 900px; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid var(--line); background: #fff; cursor: zoom-in; }
figcaption { color: var(--muted); font-size: 13px; }
figcaption a { color: var(--accent); }
.lightbox { display: none; position: fixed; inset: 0; background: rgba(0,0,0,.85); z-index: 10;
            align-items: center; justify-content: center; padding: 2vh 2vw; }
.lightbox:target { display: flex; }
.lightbox img { max-width: 96vw; max-height: 96vh; background: #fff; cursor: zoom-out; }
pre { background: #f6f7f9; border: 1px solid var(--line); padding: 12px; overflow: auto; font-size: 12.5px;
      max-height: 480px; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; }
dl.prov dt { color: var(--muted); }
dl.prov dd { margin: 0; }
ol.failures li { margin: 2px 0; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _figure(stem: str, png: Path, svg: Path | None, caption: str, out_dir: Path) -> str:
    src = png.relative_to(out_dir).as_posix()
    links = f'<a href="{_e(src)}">PNG</a>'
    if svg is not None:
        links += f' · <a href="{_e(svg.relative_to(out_dir).as_posix())}">SVG</a>'
    return (
        f'<figure id="fig-{stem}"><a href="#lb-{stem}"><img src="{_e(src)}" alt="{_e(caption)}"></a>'
        f"<figcaption>{_e(caption)} Click to enlarge; full size: {links}.</figcaption></figure>"
        f'<div class="lightbox" id="lb-{stem}"><a href="#fig-{stem}" title="close">'
        f'<img src="{_e(src)}" alt="{_e(caption)} (full size)"></a></div>'
    )


def _table_block(table: Table, data: ReportData) -> str:
    return f'<div class="scroll">{table_html(table, data.footnotes)}</div>'


def _banner(data: ReportData) -> str:
    mixed = data.mixed_references_note()
    html = (
        f'<div class="banner" id="mixed-references-banner" role="alert">Mixed references.'
        f"<small>{_e(mixed)}</small></div>"
        if mixed
        else ""
    )
    return html + _random_banner(data)


def _random_banner(data: ReportData) -> str:
    if not data.random_weights:
        return ""
    jobs = data.random_weight_jobs()
    what = "This is a smoke study" if data.study.smoke else f"{len(jobs)} of {len(data.jobs)} jobs"
    return (
        '<div class="banner" id="random-weights-banner" role="alert">RANDOM WEIGHTS — these are not real '
        "results."
        f"<small>{_e(what)} used an untrained, randomly initialised feature extractor (and/or metrics "
        "judge). "
        "The images and numbers below only show that the pipeline runs; they say nothing about style "
        "transfer quality.</small></div>"
    )


def _provenance(data: ReportData) -> str:
    prov = data.provenance()
    items = []
    for key, value in prov.items():
        if key == "versions":
            text = "; ".join(f"{k} {', '.join(v)}" for k, v in value.items()) or "no records yet"
        elif isinstance(value, list):
            text = "; ".join(map(str, value)) or "—"
        else:
            text = str(value)
        items.append(f"<dt>{_e(key)}</dt><dd>{_e(text)}</dd>")
    return f'<dl class="prov">{"".join(items)}</dl>'


def render_page(
    data: ReportData,
    tables: Sequence[Table],
    figures: Figures,
    out_dir: Path,
    files: Sequence[Path],
) -> str:
    study = data.study
    c = data.counts
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nstlab report: {_e(study.name)}{' (smoke)' if study.smoke else ''}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(study.name)}{' <small>(smoke)</small>' if study.smoke else ''}</h1>",
        f'<p class="sub">{_e(study.description) + " · " if study.description else ""}'
        f"{plural(len(data.pairs), 'pair')} × {plural(len(data.settings), 'setting')}"
        f"{' (axes: ' + _e(', '.join(study.axes)) + ')' if study.axes else ''} · generated {_e(now)}</p>",
        _banner(data),
        '<p class="counts">'
        + "".join(f'<span class="{k}">{v} {k}</span>' for k, v in c.items())
        + f"<span>{len(data.jobs)} jobs</span></p>",
    ]
    if not data.any_done:
        where = "" if data.store_found else " (no results store yet: the study has not been run)"
        parts.append(
            f'<p class="notice" id="nothing-done">Nothing is done yet{_e(where)}: 0 of {len(data.jobs)} jobs '
            f"have finished. Run <code>nstlab study run {_e(study.path.name)}"
            f"{' --smoke' if study.smoke else ''}</code>, then make this report again.</p>"
        )
    elif c["done"] < len(data.jobs):
        parts.append(
            f'<p class="notice">Partial study: {c["done"]} of {len(data.jobs)} jobs done. Cells without a '
            "finished job show — with what they wait for; means over fewer pairs say n=k/N.</p>"
        )
    nav = [
        ("tables", "Tables"),
        ("figures", "Figures"),
        ("config", "Configuration"),
        ("provenance", "Provenance"),
    ]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in nav) + "</nav>")

    summary, cost, *pairs = tables
    parts.append('<h2 id="tables">Tables</h2>')
    parts.append(_table_block(summary, data))
    parts.append(_table_block(cost, data))
    parts.append("<h3>Per pair</h3>")
    parts += [_table_block(t, data) for t in pairs]
    if data.footnotes:
        parts.append('<h3 id="failures">Failed jobs</h3><ol class="failures">')
        parts += [
            f'<li value="{f.number}">{_e(f.pair)} · {_e(f.setting)}: {_e(f.reason)}</li>'
            for f in data.footnotes
        ]
        parts.append("</ol>")

    parts.append('<h2 id="figures">Figures</h2>')
    for i, (caption, paths) in enumerate(figures.grid):
        png = next(p for p in paths if p.suffix == ".png")
        svg = next((p for p in paths if p.suffix == ".svg"), None)
        parts.append(_figure(f"grid-{i + 1}", png, svg, caption, out_dir))
    curve_figs = [
        (
            "loss",
            figures.loss,
            "Loss per evaluation: total and each weighted term, one line per setting, mean over the done "
            "pairs (up to the shortest trace), log scale.",
        ),
        (
            "iterations",
            figures.iterations,
            "Each metric against the iteration count (mean ± std over pairs).",
        ),
    ]
    for stem, fig_paths, caption in curve_figs:
        if fig_paths:
            png = next(p for p in fig_paths if p.suffix == ".png")
            svg = next((p for p in fig_paths if p.suffix == ".svg"), None)
            parts.append(_figure(stem, png, svg, caption, out_dir))
    if figures.skipped:
        parts.append('<p class="caption">Figures were not made for this report (--no-figures).</p>')
    elif figures.loss is None:
        parts.append('<p class="caption">No loss curves: no finished job has a trace yet.</p>')

    parts.append('<h2 id="config">Configuration</h2>')
    parts.append("<h3>Resolved study</h3>")
    config_json = json.dumps(data.resolved_config(), indent=2, default=str, ensure_ascii=False)
    parts.append(f"<pre>{html.escape(config_json, quote=False)}</pre>")
    try:
        toml_text = study.path.read_text()
    except OSError:
        toml_text = ""
    if toml_text:
        parts.append(f"<details><summary>Study file as written ({_e(study.path.name)})</summary>")
        parts.append(f"<pre>{html.escape(toml_text, quote=False)}</pre></details>")

    parts.append('<h2 id="provenance">Provenance</h2>')
    parts.append(_provenance(data))
    stale = data.stale_rows_note()
    if stale:
        parts.append(f'<p class="caption">{_e(stale)}</p>')
    if files:
        links = " · ".join(
            f'<a href="{_e(p.relative_to(out_dir).as_posix())}">{_e(p.name)}</a>' for p in files
        )
        parts.append(f'<p class="caption">Other formats: {links}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
