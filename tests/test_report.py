"""Study reports: table numbers against the store, best-value marks, LaTeX syntax, figures, partial and
empty studies, the HTML page in a real headless Chromium, the CLI and MLflow.

Each study here is a real smoke run (64 px, random weights, Magenta references) made once per module.
"""

from __future__ import annotations

import argparse
import csv
import html.parser
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tests.conftest import write_pair

from nstlab.cli_report import add_parser, run
from nstlab.metrics import format_table
from nstlab.report import METRICS, build_report, collect
from nstlab.report.figures import iteration_series, iterations_figure
from nstlab.report.tables import tex_escape
from nstlab.study import RunOptions, Store, Study, load_study, run_study, store_path

CHROMIUM = Path("/usr/bin/chromium")
# Pair names with characters that LaTeX, Markdown and HTML must escape.
ODD_PAIR = "a_b&c%#$1$"


def write_study(
    folder: Path, axes: str, *, pairs: tuple[str, ...] = ("p1", ODD_PAIR), name: str = "s"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, pair in enumerate(pairs):
        sub = folder / f"in{i}"
        sub.mkdir(exist_ok=True)
        c, s = write_pair(sub)
        if i:  # make the pairs differ
            Image.open(c).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(c)
        entries.append(f"{{ name = {pair!r}, content = {str(c)!r}, style = {str(s)!r} }}")
    text = (
        f'name = "{name}"\ndescription = "report test"\npairs = [{", ".join(entries)}]\n'
        f"[base]\niterations = 1000\n[axes]\n{axes}\n"
    )
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="nstlab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["report", *argv]))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- studies, made once -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def done_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """2 pairs x 2 optimisers, all done; report built with --std."""
    path = write_study(tmp_path_factory.mktemp("done"), 'optimizer = ["lbfgs", "adam"]', name="opt")
    study = load_study(path, smoke=True)
    counts = run_study(study, RunOptions(device="cpu"), quiet=True)
    assert counts["done"] == 4
    build_report(study, std=True)
    return study


@pytest.fixture(scope="module")
def partial_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Stopped after one group (1 of 4 jobs done), then one pending job marked failed."""
    path = write_study(tmp_path_factory.mktemp("partial"), 'optimizer = ["lbfgs", "adam"]', name="part")
    study = load_study(path, smoke=True)
    run_study(study, RunOptions(device="cpu", max_groups=1), quiet=True)
    store = Store(store_path(study))
    try:
        pending = [r for r in store.rows() if r["status"] == "pending"]
        assert len(pending) == 3
        store.finish(pending[0]["id"], status="failed", error="out of memory: tried to allocate 2 GiB")
    finally:
        store.close()
    build_report(study)
    return study


def store_rows(study: Study) -> list[dict[str, Any]]:
    ids = {j.id for j in study.jobs()}
    store = Store(store_path(study))
    try:
        return [r for r in store.rows() if r["id"] in ids]
    finally:
        store.close()


# --- numbers ------------------------------------------------------------------------------------------


def test_summary_cells_are_means_of_the_store_rows(done_study: Study) -> None:
    rows = store_rows(done_study)
    report = done_study.folder / "report"
    summary = {r["metric"]: r for r in read_csv(report / "summary.csv")}
    assert list(summary) == ["rmse", "psnr", "ssim"]
    for key, line in summary.items():
        for setting in done_study.settings:
            values = [r["metrics"][key] for r in rows if r["setting"] == setting.label]
            assert len(values) == 2
            assert float(line[setting.label]) == pytest.approx(np.mean(values), rel=1e-12)
            assert float(line[f"{setting.label} std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-9)
            assert line[f"{setting.label} n"] == "2"
    per_pair = read_csv(report / "per_pair.csv")
    assert len(per_pair) == 3 * len(done_study.pairs)
    for line in per_pair:
        for setting in done_study.settings:
            (row,) = [r for r in rows if r["pair"] == line["pair"] and r["setting"] == setting.label]
            assert float(line[setting.label]) == row["metrics"][line["metric"]]
    # The Markdown shows the same numbers, rounded, in the report's shape.
    md = (report / "report.md").read_text()
    psnr_lbfgs = float(summary["psnr"]["lbfgs"])
    assert re.search(r"\| PSNR \(dB\) ↑ \| \**" + re.escape(f"{psnr_lbfgs:.2f}") + " ± ", md)
    assert "| metric | lbfgs | adam |" in md
    assert "mean of the per-image PSNRs" in md and "n = 2 per cell" in md


def test_best_value_is_max_for_up_and_min_for_down(done_study: Study) -> None:
    rows = store_rows(done_study)
    report = done_study.folder / "report"
    md_tables = (report / "report.md").read_text()
    for line in read_csv(report / "summary.csv"):
        key = line["metric"]
        means = {
            s.label: np.mean([r["metrics"][key] for r in rows if r["setting"] == s.label])
            for s in done_study.settings
        }
        higher = METRICS[key][2]
        assert line["direction"] == ("↑" if higher else "↓")
        expected = (max if higher else min)(means, key=lambda label: means[label])
        assert line["best"] == expected
        # Markdown: the bold cell sits in the best setting's column.
        name, arrow, _ = METRICS[key]
        md_row = next(r for r in md_tables.splitlines() if r.startswith(f"| {name} {arrow} |"))
        cells = [c.strip() for c in md_row.strip("|").split("|")][1:]
        bold = [label for label, c in zip(means, cells, strict=True) if c.startswith("**")]
        assert bold == [expected]
    for line in read_csv(report / "per_pair.csv"):
        values = {s.label: float(line[s.label]) for s in done_study.settings}
        pick = max if METRICS[line["metric"]][2] else min
        assert line["best"] == pick(values, key=lambda label: values[label])


def test_directions_agree_with_metrics_format_table() -> None:
    text = format_table(dict.fromkeys(METRICS, 1.0))
    for name, arrow, _ in METRICS.values():
        assert f"{name} {arrow}" in text


def test_cost_table(done_study: Study) -> None:
    rows = store_rows(done_study)
    cost = {r["metric"]: r for r in read_csv(done_study.folder / "report" / "cost.csv")}
    assert list(cost) == ["evaluations", "wall_time_s", "peak_memory_mib"]
    for s in done_study.settings:
        mine = [r for r in rows if r["setting"] == s.label]
        assert float(cost["evaluations"][s.label]) == np.mean([r["evaluations"] for r in mine])
        assert float(cost["wall_time_s"][s.label]) == pytest.approx(np.mean([r["wall_time_s"] for r in mine]))
        mib = np.mean([r["peak_memory_bytes"] for r in mine]) / 2**20
        assert float(cost["peak_memory_mib"][s.label]) == pytest.approx(mib)
    assert cost["evaluations"]["best"] == ""  # the budget is not a "better or worse"


# --- LaTeX --------------------------------------------------------------------------------------------


def check_latex(text: str) -> int:
    """Syntax checks without a TeX install; returns the number of tabulars."""
    stack: list[str] = []
    for m in re.finditer(r"\\(begin|end)\{([^}]*)\}", text):
        if m.group(1) == "begin":
            stack.append(m.group(2))
        else:
            assert stack and stack.pop() == m.group(2), f"unbalanced \\end{{{m.group(2)}}}"
    assert not stack, f"unclosed environments: {stack}"
    code = "\n".join(line for line in text.splitlines() if not line.startswith("%"))
    unescaped = re.sub(r"\\[{}]", "", code)
    assert unescaped.count("{") == unescaped.count("}")
    assert not re.search(
        r"(?<!\\)[%#_$&]",
        code.replace("$\\pm$", "").replace("$\\uparrow$", "").replace("$\\downarrow$", "").replace(" & ", ""),
    ), "unescaped special character"
    tabulars = list(re.finditer(r"\\begin\{tabular\}\{([lcr]+)\}\n(.*?)\\end\{tabular\}", text, re.S))
    assert tabulars
    for tab in tabulars:
        ncols = len(tab.group(1))
        body = [line.strip() for line in tab.group(2).strip().splitlines()]
        assert body[0] == r"\toprule" and body[2] == r"\midrule" and body[-1] == r"\bottomrule"
        rows = [line for line in body if line not in (r"\toprule", r"\midrule", r"\bottomrule")]
        assert len(rows) >= 2
        for line in rows:
            assert line.endswith(r"\\"), line
            assert len(re.findall(r"(?<!\\)&", line)) == ncols - 1, line
    return len(tabulars)


def test_latex_tables_are_well_formed(done_study: Study) -> None:
    report = done_study.folder / "report"
    assert check_latex((report / "summary.tex").read_text()) == 1
    assert check_latex((report / "cost.tex").read_text()) == 1
    per_pair = (report / "per_pair.tex").read_text()
    assert check_latex(per_pair) == len(done_study.pairs)
    assert r"a\_b\&c\%\#\$1\$" in per_pair and ODD_PAIR not in per_pair
    summary = (report / "summary.tex").read_text()
    assert r"\textbf{" in summary and r"$\pm$" in summary and r"$\uparrow$" in summary
    assert "TABLE\\_PSNR" in summary and "n = 2 per cell" in summary
    assert "RANDOM WEIGHTS" in summary  # as a comment above the table


def test_tex_escape() -> None:
    assert tex_escape(r"a_b & c% #1 $x {y} ~^\ ") == (
        r"a\_b \& c\% \#1 \$x \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{} "
    )


# --- figures ------------------------------------------------------------------------------------------


def test_figures_are_valid_images(done_study: Study) -> None:
    figs = done_study.folder / "report" / "figures"
    for stem in ("grid", "loss_curves"):
        with Image.open(figs / f"{stem}.png") as img:
            img.verify()
        with Image.open(figs / f"{stem}.png") as img:
            assert img.width >= 600 and img.height >= 300, img.size
        root = ET.parse(figs / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
    # Grid: 2 rows of pairs, 3 + 2 columns; wider than tall.
    with Image.open(figs / "grid.png") as img:
        assert img.width > img.height
    assert not (figs / "metrics_vs_iterations.png").exists()  # iterations is not an axis here


def test_metrics_vs_iterations_figure(tmp_path: Path) -> None:
    study = load_study(
        write_study(tmp_path, "iterations = [400, 1000]", pairs=("p1",), name="it"), smoke=True
    )
    run_study(study, RunOptions(device="cpu"), quiet=True)  # one run serves both counts (2 and 5)
    data = collect(study, ["psnr", "ssim"])
    assert iteration_series(data, "psnr") == {
        "all": [
            (2, pytest.approx(data.jobs[0].metrics["psnr"]), 0.0, 1),
            (5, pytest.approx(data.jobs[1].metrics["psnr"]), 0.0, 1),
        ]
    }
    paths = iterations_figure(data, tmp_path / "figs")
    assert paths is not None
    with Image.open(paths[0]) as img:
        assert img.width > 400
    ET.parse(paths[1])


# --- HTML ---------------------------------------------------------------------------------------------


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append(value)


def test_html_is_self_contained(done_study: Study) -> None:
    report = done_study.folder / "report"
    text = (report / "index.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags  # inline CSS, no scripts
    for ref in parser.refs:
        assert not re.match(r"[a-z]+:", ref), f"absolute link {ref}"
        if not ref.startswith("#"):
            assert (report / ref).is_file(), ref
    assert parser.tags.count("table") == 2 + len(done_study.pairs)
    assert 'id="random-weights-banner"' in text and "not real" in text
    assert "a_b&amp;c%#$1$" in text  # escaped
    assert '"optimizer": "adam"' in text  # the resolved config
    assert "magenta" in text and "torch" in text  # provenance


def test_html_in_headless_chromium(done_study: Study, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    page_file = done_study.folder / "report" / "index.html"
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri(), wait_until="load")
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) >= 4 and all(w > 0 for w in widths), widths
            assert page.locator("table").count() == 2 + len(done_study.pairs)
            assert page.locator("#random-weights-banner").is_visible()
            assert "not real results" in page.locator("#random-weights-banner").inner_text()
            assert not page.locator("#lb-grid-1").is_visible()
            page.screenshot(path=str(shot), full_page=True)
            page.click("#fig-grid-1 img")  # the CSS lightbox opens on click, closes on a second click
            assert page.locator("#lb-grid-1").is_visible()
            page.click("#lb-grid-1 img")
            assert not page.locator("#lb-grid-1").is_visible()
        finally:
            browser.close()
    assert all(url.startswith("file://") for url in requests), requests
    with Image.open(shot) as img:
        assert img.width == 1280 and img.height > 1500
    print(f"screenshot: {shot}")


# --- partial and empty studies ------------------------------------------------------------------------


def test_partial_study_marks_missing_cells(partial_study: Study) -> None:
    report = partial_study.folder / "report"
    rows = {(r["pair"], r["setting"]): r for r in store_rows(partial_study)}
    done = [k for k, r in rows.items() if r["status"] == "done"]
    failed = [k for k, r in rows.items() if r["status"] == "failed"]
    assert len(done) == 1 and len(failed) == 1
    md = (report / "report.md").read_text()
    assert "Partial study: 1/4 jobs done" in md
    assert "— (failed [1])" in md and "— (pending)" in md
    assert "1. " in md and "out of memory: tried to allocate 2 GiB" in md
    # Summary: the done setting's mean is over 1 of 2 pairs; the other setting has no value.
    summary = {r["metric"]: r for r in read_csv(report / "summary.csv")}
    done_setting = done[0][1]
    other = next(s.label for s in partial_study.settings if s.label != done_setting)
    assert float(summary["psnr"][done_setting]) == rows[done[0]]["metrics"]["psnr"]
    assert summary["psnr"][f"{done_setting} n"] == "1" and summary["psnr"][other] == ""
    assert summary["psnr"]["best"] == ""  # one value: nothing to compare
    assert "(n=1/2" in md
    per_pair = read_csv(report / "per_pair.csv")
    assert sum(1 for r in per_pair for s in partial_study.settings if r[s.label] == "") == 3 * 3
    html_text = (report / "index.html").read_text()
    assert 'class="missing"' in html_text and "out of memory" in html_text
    for name in ("summary.tex", "per_pair.tex", "cost.tex"):
        check_latex((report / name).read_text())
    assert "out of memory" in (report / "per_pair.tex").read_text()
    with Image.open(report / "figures" / "grid.png") as img:
        img.verify()


@pytest.fixture(scope="module")
def fresh_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Never run: no store at all."""
    path = write_study(tmp_path_factory.mktemp("fresh"), 'optimizer = ["lbfgs", "adam"]', name="fresh")
    return load_study(path, smoke=True)


def test_study_with_nothing_done(fresh_study: Study) -> None:
    study = fresh_study
    out = build_report(study)
    assert not store_path(study).exists()  # reporting never creates a store
    md = (out / "report.md").read_text()
    assert "Nothing is done yet" in md and "**" not in md.split("## Metrics", 1)[1].split("##", 1)[0]
    assert 'id="nothing-done"' in (out / "index.html").read_text()
    assert all(r[s.label] == "" for r in read_csv(out / "summary.csv") for s in study.settings)
    check_latex((out / "summary.tex").read_text())
    assert (out / "figures" / "grid.png").is_file() and not (out / "figures" / "loss_curves.png").exists()


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_format_md_only(done_study: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    args = [str(done_study.path), "--smoke", "--out", str(out), "--metrics", "psnr,mse,rmse"]
    assert cli(*args, "--format", "md", "--no-figures") == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # (figures/ too without --no-figures)
    md = (out / "report.md").read_text()
    order = [md.index(f"| {name} ") for name in ("PSNR (dB) ↑", "MSE ↓", "RMSE ↓")]
    assert order == sorted(order)
    assert "report: " in capsys.readouterr().out
    assert cli(*args, "--format", "csv", "--format", "latex", "-q", "--no-figures") == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "per_pair.csv", "cost.csv", "jobs.csv", "summary.tex", "per_pair.tex"} <= names
    assert "index.html" not in names and "figures" not in names
    assert [r["metric"] for r in read_csv(out / "summary.csv")] == ["psnr", "mse", "rmse"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.toml"], "study file missing.toml does not exist"),
        (["{study}", "--smoke", "--format", "pdf"], "unknown report format 'pdf'"),
        (["{study}", "--smoke", "--metrics", "psnr,ssmi"], "Did you mean 'ssim'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    done_study: Study, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = cli(*(a.format(study=done_study.path) for a in argv), "--no-figures")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nstlab: error: ") and err.count("\n") == 1 and message in err


def test_cli_mlflow_not_installed(
    done_study: Study, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    assert cli(str(done_study.path), "--smoke", "--mlflow", "file:/nowhere", "--no-figures") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nstlab[mlflow]'" in err


@pytest.fixture
def mlflow_file_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'nstlab[mlflow]')")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_mlflow_logs_one_run_per_job(
    done_study: Study, tmp_path: Path, mlflow_file_store: None, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    if store == "sqlite":  # the store docs/report.md shows; needs the extra's sqlalchemy and alembic
        pytest.importorskip("sqlalchemy")
        pytest.importorskip("alembic")
        # A sqlite store keeps artifacts under ./mlruns of the working directory (MLflow's default root).
        monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "mlruns").as_uri() if store == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(done_study.path), "--smoke", "--mlflow", uri, "--no-figures", "--format", "md", "-q"]
    assert cli(*args, "--out", str(tmp_path / "r")) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("opt (smoke)")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4
    rows = {r["id"]: r for r in store_rows(done_study)}
    for r in runs:
        row = rows[r.data.tags["nstlab.job_id"]]
        assert r.data.params["pair"] == row["pair"] and r.data.params["optimizer"] == row["setting"]
        assert r.data.metrics["psnr"] == pytest.approx(row["metrics"]["psnr"])
        assert r.data.tags["nstlab.random_weights"] == "true" and r.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert Path(row["output"]).name in artifacts
    assert cli(*args, "--out", str(tmp_path / "r")) == 0  # again: no duplicate runs
    assert len(client.search_runs([exp.experiment_id])) == 4


def test_out_dir_format_md_with_figures_and_rerun(fresh_study: Study, tmp_path: Path) -> None:
    out = build_report(fresh_study, tmp_path / "elsewhere", formats=("md",))
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.md"]
    stale = out / "figures" / "grid-2.png"
    shutil.copy(out / "figures" / "grid.png", stale)
    build_report(fresh_study, out, formats=("md",))
    assert not stale.exists()  # figures of an earlier report that no longer apply are removed
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["grid.png", "grid.svg"]


def test_number_formats_keep_significant_zeros_and_latex_minus() -> None:
    from nstlab.report.data import Cell, format_std, format_value
    from nstlab.report.tables import _tex_cell

    # 4 significant digits, trailing zeros kept, so a column lines up (0.3550 beside 0.3474).
    assert [format_value("rmse", v) for v in (0.355, 0.3474, 1000.0, 1.2e-5, 2.5)] == [
        "0.3550",
        "0.3474",
        "1000",
        "1.200e-05",
        "2.500",
    ]
    assert format_value("psnr", 21.5) == "21.50" and format_value("ssim", 0.5) == "0.5000"
    assert format_std("rmse", 0.01234) == "0.012" and format_std("ssim", 0.02651) == "0.0265"
    # LaTeX gets a minus sign, not a hyphen.
    assert _tex_cell("mse", Cell(mean=-0.0018, n=1), std=False) == "$-$0.001800"
    assert _tex_cell("mse", Cell(mean=0.0018, n=1), std=False) == "0.001800"


def test_rows_of_an_earlier_study_version_are_counted_in_markdown_and_html(tmp_path: Path) -> None:
    path = write_study(tmp_path, 'optimizer = ["lbfgs", "adam"]', name="edit")
    assert run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)["done"] == 4
    path.write_text(path.read_text().replace('optimizer = ["lbfgs", "adam"]', 'optimizer = ["adam"]'))
    out = build_report(load_study(path, smoke=True), formats=("md", "html"), figures=False)
    note = "2 rows in the store belong to an earlier version of the study file"
    assert (
        note in (out / "report.md").read_text()
        and "2 rows in the store belong" in (out / "index.html").read_text()
    )


def test_references_from_two_makers_are_flagged(tmp_path: Path) -> None:
    # maker = "auto" where AdaIN's weights could be had for some pairs and not for others: Magenta's and
    # AdaIN's references are different targets, so the report says so above the tables.
    path = write_study(tmp_path, 'optimizer = ["adam"]', name="mix")
    study = load_study(path, smoke=True)
    assert run_study(study, RunOptions(device="cpu"), quiet=True)["done"] == 2
    out = build_report(study, formats=("md", "html"), figures=False)
    assert "Mixed references" not in (out / "report.md").read_text()  # one maker (offline: Magenta)
    store = Store(store_path(study))
    row = next(r for r in store.rows() if r["pair"] == "p1")
    assert row["reference"]["maker"] == "magenta"
    store.finish(row["id"], reference={**row["reference"], "maker": "adain"})
    store.close()
    out = build_report(study, formats=("md", "html"), figures=False)
    md = (out / "report.md").read_text()
    assert "**⚠ Mixed references.** Pseudo ground truths come from 2 makers (adain: p1; magenta: a" in md
    assert 'id="mixed-references-banner"' in (out / "index.html").read_text()
