"""Tables as Markdown, CSV, LaTeX (booktabs) and HTML, from :class:`~nstlab.report.data.Table`.

Shape (all formats): one row per metric with its direction arrow, one column per setting (study order).
The best value of a row is bold in Markdown and HTML, ``\\textbf`` in LaTeX, and named in the CSV's last
column ``best`` (CSV cells stay plain numbers). A cell with no finished job shows "—" (LaTeX ``---``, CSV
empty) with what it is waiting for: "pending", or "failed [k]" where footnote k gives the reason.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from collections.abc import Sequence

from nstlab.report.data import CSV_NAMES, MISSING, Cell, Footnote, Table, format_std, format_value

# --- plain text of a cell -----------------------------------------------------------------------------


def _value_text(key: str, cell: Cell, std: bool) -> str:
    assert cell.mean is not None
    text = format_value(key, cell.mean)
    if std and cell.std is not None and cell.n > 1:
        text += f" ± {format_std(key, cell.std)}"
    return text


# --- Markdown -----------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*|<>\[\]])")  # not "_": GFM ignores intraword underscores


def md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_cell(key: str, cell: Cell, std: bool) -> str:
    notes = cell.notes()
    if cell.mean is None:
        return " ".join([MISSING, *(f"({n})" for n in notes)])
    text = _value_text(key, cell, std)
    if cell.best:
        text = f"**{text}**"
    return " ".join([text, *(f"({n})" for n in notes)])


def table_markdown(table: Table, heading: str = "###") -> str:
    cols = ["metric", *(md_escape(c) for c in table.columns)]
    lines = [
        f"{heading} {table.title}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|",
    ]
    for row in table.rows:
        cells = [_md_cell(row.key, c, table.std) for c in row.cells]
        lines.append("| " + " | ".join([md_escape(row.label), *cells]) + " |")
    lines.append("")
    lines += [f"*{md_escape(note)}*" if i == 0 else md_escape(note) for i, note in enumerate(table.notes)]
    return "\n".join(lines) + "\n"


def footnotes_markdown(footnotes: Sequence[Footnote]) -> str:
    if not footnotes:
        return ""
    lines = ["### Failed jobs", ""]
    lines += [
        f"{f.number}. {md_escape(f.pair)} · {md_escape(f.setting)}: {md_escape(f.reason)}" for f in footnotes
    ]
    return "\n".join(lines) + "\n"


# --- CSV ----------------------------------------------------------------------------------------------


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))


def table_csv(table: Table, pair: str | None = None, header: bool = True) -> list[list[str]]:
    """CSV rows: ``[pair,] metric, direction, <setting>..., [<setting> std...,] <setting> n..., best``.

    Values are full precision; an empty cell has no finished job; ``best`` lists the best settings' labels
    (joined with " | " on ties; empty when fewer than two settings have a value or the row has no direction).
    """
    lead = ["pair"] if pair is not None else []
    out: list[list[str]] = []
    if header:
        cols = [*lead, "metric", "direction", *table.columns]
        if table.std:
            cols += [f"{c} std" for c in table.columns]
        cols += [f"{c} n" for c in table.columns]
        out.append([*cols, "best"])
    for row in table.rows:
        cells = [_csv_number(c.mean) for c in row.cells]
        if table.std:
            cells += [_csv_number(c.std if c.mean is not None else None) for c in row.cells]
        cells += [str(c.n) for c in row.cells]
        best = " | ".join(col for col, c in zip(table.columns, row.cells, strict=True) if c.best)
        name = CSV_NAMES.get(row.key, row.key)
        out.append([*([pair] if pair is not None else []), name, row.arrow, *cells, best])
    return out


def write_csv_text(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# --- LaTeX --------------------------------------------------------------------------------------------

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "±": r"$\pm$",
    "—": "---",
    "–": "--",
    "·": r"$\cdot$",
    "×": r"$\times$",
}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_SPECIAL))


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and map ↑ ↓ ± — · × to math/text commands)."""
    return _TEX_RE.sub(lambda m: _TEX_SPECIAL[m.group(0)], text)


def _tex_cell(key: str, cell: Cell, std: bool) -> str:
    notes = cell.notes()
    suffix = "".join(rf" {{\footnotesize ({tex_escape(n)})}}" for n in notes)
    if cell.mean is None:
        return "---" + suffix
    value = format_value(key, cell.mean)
    # A minus sign, not the text hyphen a bare "-" sets (-0.0018 of a TV-only setting, -inf)
    text = "$-$" + tex_escape(value[1:]) if value.startswith("-") else tex_escape(value)
    if std and cell.std is not None and cell.n > 1:
        text = f"{text} $\\pm$ {tex_escape(format_std(key, cell.std))}"
    if cell.best:
        text = rf"\textbf{{{text}}}"
    return text + suffix


def table_latex(table: Table, label_prefix: str, footnotes: Sequence[Footnote] = ()) -> str:
    """A complete ``table`` environment (needs ``\\usepackage{booktabs}``), ready to ``\\input``."""
    n = len(table.columns)
    notes = " ".join(tex_escape(t) for t in table.notes)
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        rf"\caption{{{tex_escape(table.title)}. {notes}}}",
        rf"\label{{{label_prefix}:{re.sub(r'[^A-Za-z0-9:-]', '-', table.id)}}}",
        rf"\begin{{tabular}}{{l{'r' * n}}}",
        r"\toprule",
        " & ".join(["Metric", *(tex_escape(c) for c in table.columns)]) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = [_tex_cell(row.key, c, table.std) for c in row.cells]
        lines.append(" & ".join([tex_escape(row.label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    used = {f for row in table.rows for c in row.cells for f in c.failed}
    notes_used = [f for f in footnotes if f.number in used]
    if notes_used:
        lines.append(r"\par\smallskip\footnotesize")
        lines += [
            rf"[{f.number}] {tex_escape(f.pair)}, {tex_escape(f.setting)}: {tex_escape(f.reason)}\par"
            for f in notes_used
        ]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# --- HTML ---------------------------------------------------------------------------------------------


def _html_cell(key: str, cell: Cell, std: bool, footnotes: dict[int, Footnote]) -> str:
    notes = cell.notes()
    title = "; ".join(
        f"[{f}] {footnotes[f].pair} · {footnotes[f].setting}: {footnotes[f].reason}"
        for f in cell.failed
        if f in footnotes
    )
    attrs = f' title="{html.escape(title)}"' if title else ""
    note_html = "".join(f' <span class="note">({html.escape(n)})</span>' for n in notes)
    if cell.mean is None:
        return f'<td class="missing"{attrs}>{MISSING}{note_html}</td>'
    text = html.escape(_value_text(key, cell, std))
    if cell.best:
        return f'<td class="best"{attrs}><strong>{text}</strong>{note_html}</td>'
    return f"<td{attrs}>{text}{note_html}</td>"


def table_html(table: Table, footnotes: Sequence[Footnote] = ()) -> str:
    by_number = {f.number: f for f in footnotes}
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in table.columns)
    body = []
    for row in table.rows:
        cells = "".join(_html_cell(row.key, c, table.std, by_number) for c in row.cells)
        body.append(f'<tr><th scope="row">{html.escape(row.label)}</th>{cells}</tr>')
    notes = "".join(f'<p class="caption">{html.escape(n)}</p>' for n in table.notes)
    return (
        f'<table id="table-{html.escape(table.id)}"><caption>{html.escape(table.title)}</caption>'
        f'<thead><tr><th scope="col">metric</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f"{notes}"
    )
