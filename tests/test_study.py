"""Studies: grid expansion, job identity, the SQLite store under kills and concurrency, executors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import write_pair

import nstlab
from nstlab.errors import ConfigError, DeviceError, InputError
from nstlab.images import to_pil
from nstlab.study import RunOptions, Store, identity, load_study, run_study, store_path

ROOT = Path(__file__).resolve().parents[1]


def write_study(folder: Path, axes: str, *, pairs: int = 2, base: str = "", name: str = "s") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(pairs):
        sub = folder / f"in{i}"
        sub.mkdir(exist_ok=True)
        c, s = write_pair(sub)
        if i:  # make the pairs differ in content
            Image.open(c).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(c)
        entries.append(f'{{ name = "p{i}", content = "{c}", style = "{s}" }}')
    text = (
        f'name = "{name}"\npairs = [{", ".join(entries)}]\n[base]\ndevice = "cpu"\n{base}\n[axes]\n{axes}\n'
    )
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


# --- grid expansion and validation ----------------------------------------------------------------------


def test_grid_expansion_with_optimizer_lr_lists(tmp_path: Path) -> None:
    path = write_study(
        tmp_path, 'optimizer = ["lbfgs", { optimizer = "adam", lr = [0.01, 0.1] }]\niterations = [1000, 2000]'
    )
    study = load_study(path)
    labels = [s.label for s in study.settings]
    assert labels == [
        "lbfgs / 1000",
        "lbfgs / 2000",
        "adam lr=0.01 / 1000",
        "adam lr=0.01 / 2000",
        "adam lr=0.1 / 1000",
        "adam lr=0.1 / 2000",
    ]
    jobs = study.jobs()
    assert len(jobs) == 12 and len({j.id for j in jobs}) == 12
    adam = [j for j in jobs if j.setting.label == "adam lr=0.1 / 2000"][0]
    assert (adam.config.optimizer, adam.config.lr, adam.config.iterations) == ("adam", 0.1, 2000)
    # Jobs differing only in iterations share a group (one run with snapshots).
    assert len({j.group for j in jobs}) == 6


def test_list_valued_fields_are_single_settings(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, 'losses = [["content", "style"], ["content", "style", "tv"]]'))
    assert [s.label for s in study.settings] == ["content+style", "content+style+tv"]


@pytest.mark.parametrize(
    ("axes", "pattern"),
    [
        ('optimiser = ["adam"]', "unknown key 'optimiser'.*Did you mean 'optimizer'"),
        ('optimizer = ["adma"]', "unknown optimizer 'adma'.*Did you mean 'adam'"),
        ('optimizer = [{ optimizer = "adam", lrr = [0.1] }]', "unknown key 'lrr'.*Did you mean 'lr'"),
        ("iterations = []", "non-empty list"),
        ('extractor = ["vgg16", "vgg16"]', "duplicate settings"),
        ("size = [0]", "size must be an integer >= 1"),
    ],
)
def test_validation_errors_name_the_field(tmp_path: Path, axes: str, pattern: str) -> None:
    path = write_study(tmp_path, axes)
    with pytest.raises(ConfigError, match=pattern):
        load_study(path)


@pytest.mark.parametrize(
    ("edit", "error", "pattern"),
    [
        # A value of the wrong shape is one line naming the table, not a TypeError from deep inside.
        (('[base]\ndevice = "cpu"', "base = 5"), ConfigError, r"\[base\] must be a table"),
        (('name = "s"', 'name = "s"\nreference = "magenta"'), ConfigError, r"\[reference\] must be a table"),
        (('name = "s"', 'name = "s"\nmetrics = ["rmse"]'), ConfigError, r"\[metrics\] must be a table"),
        (
            ("[axes]\n", '[metrics]\nnmes = ["rmse"]\n[axes]\n'),
            ConfigError,
            "unknown key 'nmes'.*Did you mean 'names'",
        ),
        (("[axes]\n", "[metrics]\nnames = []\n[axes]\n"), ConfigError, r"\[metrics\].names is empty"),
        (("[axes]\n", '[metrics]\nnames = "rmse"\n[axes]\n'), ConfigError, "must be a list of strings"),
        (('name = "s"', 'name = "s"\npair_names = []'), ConfigError, "pair_names is empty"),
        (
            ('name = "s"', 'name = "s"\npair_names = "p0"'),
            ConfigError,
            "pair_names must be a list of strings",
        ),
        (
            ('name = "s"', 'name = "s"\npair_names = ["p0", "p1", "p0"]'),
            ConfigError,
            "lists p0 more than once",
        ),
        (
            ("[axes]\n", "[reference]\nadain_weights = 3\n[axes]\n"),
            ConfigError,
            "must be a directory path, got 3",
        ),
        (('name = "s"', "name = 5"), ConfigError, "name must be a string"),
        (('name = "p0"', 'name = "../../evil"'), ConfigError, "pair name '../../evil' cannot be a file name"),
        (('name = "p1"', 'name = "a/b"'), ConfigError, "pair name 'a/b' cannot be a file name"),
        (('name = "p0",', 'name = "p0", weight = 2,'), ConfigError, "unknown key 'weight'"),
    ],
)
def test_malformed_tables_and_names_are_one_line_errors(
    tmp_path: Path, edit: tuple[str, str], error: type[Exception], pattern: str
) -> None:
    path = write_study(tmp_path, 'optimizer = ["adam"]')
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(error, match=pattern) as info:
        load_study(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s").exists() and not (tmp_path.parent / "evil").exists()  # nothing written


def test_pairs_csv_with_bom_short_rows_and_other_separators(tmp_path: Path) -> None:
    c, s = write_pair(tmp_path)
    csv_path = tmp_path / "pairs.csv"
    study = tmp_path / "study.toml"
    study.write_text('pairs = "pairs.csv"\n[base]\ndevice = "cpu"\n')
    csv_path.write_text(f"pair,content,style\np1,{c.name},{s.name}\n", encoding="utf-8-sig")  # Excel's BOM
    assert [p.name for p in load_study(study).pairs] == ["p1"]
    csv_path.write_text(f"pair;content;style\np1;{c.name};{s.name}\n")
    with pytest.raises(
        ConfigError, match="comma-separated columns pair,content,style; its header is pair;content"
    ):
        load_study(study)
    csv_path.write_text(f"pair,content,style\np1,{c.name}\n")
    with pytest.raises(ConfigError, match="line 2: needs a pair, content and style value"):
        load_study(study)
    # Blank lines count: the message names the line a spreadsheet or editor shows.
    csv_path.write_text(f"pair,content,style\n\np1,{c.name},{s.name}\n\np2,{c.name}\n")
    with pytest.raises(ConfigError, match="line 5: needs a pair"):
        load_study(study)
    csv_path.write_text(f"pair,content,style\np1,{tmp_path.name and '.'},{s.name}\n")
    with pytest.raises(InputError, match="is a directory, not an image file"):
        load_study(study)


def test_smoke_with_a_non_integer_iteration_count_is_a_config_error(tmp_path: Path) -> None:
    for edit in (
        ("[axes]\n", '[axes]\niterations = ["x"]\n'),
        ('device = "cpu"', 'device = "cpu"\niterations = "x"'),
        ('device = "cpu"', 'device = "cpu"\niterations = 0'),
        ("[axes]\n", "[axes]\niterations = [1000, -5]\n"),
    ):
        path = write_study(tmp_path, 'optimizer = ["adam"]')
        path.write_text(path.read_text().replace(*edit, 1))
        with pytest.raises(ConfigError, match="iterations"):
            load_study(path, smoke=True)


def test_reference_dir_is_relative_to_the_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_study(tmp_path / "here", 'optimizer = ["adam"]')
    path.write_text(path.read_text() + '[reference]\nmaker = "folder"\nreference_dir = "refs"\n')
    monkeypatch.chdir(tmp_path)  # not the study's folder
    with pytest.raises(InputError, match=f"reference_dir {tmp_path / 'here' / 'refs'} is not a folder"):
        load_study(path)
    # Only the folder maker reads it: with another maker a missing folder is not an error.
    path.write_text(path.read_text().replace('maker = "folder"', 'maker = "magenta"'))
    assert load_study(path).reference["reference_dir"] == str(tmp_path / "here" / "refs")
    path.write_text(path.read_text().replace('maker = "magenta"', 'maker = "folder"'))
    (tmp_path / "here" / "refs").mkdir()
    assert load_study(path).reference["reference_dir"] == str(tmp_path / "here" / "refs")


def test_bad_study_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("pairs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(bad)
    bad.write_text('pair = "x.csv"\n')
    with pytest.raises(ConfigError, match="Did you mean 'pairs'"):
        load_study(bad)
    bad.write_text('pairs = [{ name = "a", content = "missing.png", style = "missing.png" }]\n')
    with pytest.raises(InputError, match="missing.png does not exist"):
        load_study(bad)


def test_shipped_studies_reproduce_the_report(shared_data: Path) -> None:
    studies = {p.stem: load_study(p) for p in (ROOT / "studies").glob("*.toml")}
    assert set(studies) == {"optimizers", "lr_search", "iterations", "extractors", "losses", "init"}
    for study in studies.values():
        for job in study.jobs():
            assert job.config.size == 512
            assert job.config.iterations in (1000, 1500, 2000)
    assert [s.label for s in studies["optimizers"].settings] == ["lbfgs", "adam lr=0.1", "adamw lr=0.01"]
    assert len(studies["optimizers"].pairs) == 8
    assert [p.name for p in studies["lr_search"].pairs] == ["pair-2"]
    assert [j.config.iterations for j in studies["iterations"].jobs()][:3] == [1000, 1500, 2000]
    smoke = load_study(ROOT / "studies" / "iterations.toml", smoke=True)
    assert smoke.folder.name == "smoke" and all(j.config.weights == "random" for j in smoke.jobs())
    assert [j.config.iterations for j in smoke.jobs()][:3] == [5, 8, 10]


# --- identity --------------------------------------------------------------------------------------------


def test_identity_is_stable_and_content_addressed(tmp_path: Path) -> None:
    path = write_study(tmp_path / "a", 'optimizer = ["lbfgs", "adam"]')
    ids = [j.id for j in load_study(path).jobs()]
    assert ids == [j.id for j in load_study(path).jobs()]  # stable across loads
    job = load_study(path).jobs()[0]
    # Same bytes elsewhere: same identity. Device does not count; any computed field does.
    moved = tmp_path / "moved"
    moved.mkdir()
    pair = type(job.pair)(
        "other-name",
        Path(shutil.copy(job.pair.content, moved / "c.png")),
        Path(shutil.copy(job.pair.style, moved / "s.png")),
    )
    assert identity(job.config, pair) == job.id
    assert identity(job.config.replace(device="cuda"), job.pair) == job.id
    assert identity(job.config.replace(checkpoint="on"), job.pair) == job.id  # same result, less memory
    # A field added later is hashed only away from the value that reproduces older results.
    assert identity(job.config.replace(lbfgs_history=100), job.pair) == job.id
    assert identity(job.config.replace(lbfgs_history=10), job.pair) != job.id
    # Configs that request a layer followed by an in-place ReLU changed meaning (a fix): new ids for them.
    conv = nstlab.StylizeConfig(extractor="vgg19", content_layers=("conv4_2",))
    relu = nstlab.StylizeConfig(extractor="vgg19", content_layers=("relu4_2",))
    from nstlab.study.spec import _affected_by_relu_fix

    assert _affected_by_relu_fix(conv) and not _affected_by_relu_fix(relu)
    assert not _affected_by_relu_fix(job.config)  # the report's layers are untouched

    assert identity(job.config.replace(seed=1), job.pair) != job.id
    assert identity(job.config.replace(tv_weight=5.0), job.pair) != job.id
    Image.open(pair.content).rotate(90).save(pair.content)
    os.utime(pair.content, ns=(1, 1))  # a different mtime even on coarse-timestamp file systems
    assert identity(job.config, pair) != job.id


def test_settings_that_compute_the_same_job_are_refused(tmp_path: Path) -> None:
    path = write_study(tmp_path, 'checkpoint = ["on", "off"]')
    with pytest.raises(ConfigError, match="'on' and 'off' compute the same job"):
        load_study(path)


# --- running -----------------------------------------------------------------------------------------------


def test_run_resume_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, 'optimizer = ["lbfgs", "adam"]')
    study = load_study(path, smoke=True)
    counts = run_study(study, RunOptions(max_groups=1, device="cpu"), quiet=True)
    assert counts == {"pending": 3, "running": 0, "done": 1, "failed": 0}
    counts = run_study(study, RunOptions(device="cpu"), quiet=True)
    assert counts["done"] == 4
    store = Store(store_path(study))
    rows = store.rows()
    assert all(r["attempts"] == 1 for r in rows)  # nothing ran twice
    for r in rows:
        assert set(r["metrics"]) >= {"rmse", "psnr", "ssim", "mse"}
        assert (study.folder / r["output"]).is_file() and (study.folder / r["record"]).is_file()
        assert r["reference"]["maker"] == "magenta"
    assert store.integrity() == "ok"
    store.close()
    # A third run has nothing to do.
    assert run_study(study, RunOptions(device="cpu"), quiet=True)["done"] == 4
    from nstlab.cli import main

    assert main(["study", "status", str(path), "--smoke"]) == 0
    assert "4/4 done, 0 running, 0 failed, 0 pending" in capsys.readouterr().out


def test_failing_job_is_recorded_and_the_rest_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, "style_weight = [1e6, 1e300]")
    from nstlab.cli import main

    code = main(["study", "run", str(path), "--smoke", "--quiet", "--device", "cpu"])
    assert code == 1  # some jobs failed
    study = load_study(path, smoke=True)
    store = Store(store_path(study))
    rows = {(r["pair"], r["setting"]): r for r in store.rows()}
    store.close()
    assert rows[("p0", "1e+06")]["status"] == rows[("p1", "1e+06")]["status"] == "done"
    failed = rows[("p0", "1e+300")]
    assert failed["status"] == "failed" and "non-finite at iteration 1" in failed["error"]
    main(["study", "status", str(path), "--smoke", "--failed"])
    assert "non-finite" in capsys.readouterr().out


def test_iteration_sweep_snapshots_equal_separate_runs(tmp_path: Path) -> None:
    path = write_study(tmp_path, "iterations = [1000, 2000]", pairs=1)  # smoke: 5 and 10 evaluations
    study = load_study(path, smoke=True)
    run_study(study, RunOptions(device="cpu"), quiet=True)
    store = Store(store_path(study))
    rows = store.rows()
    store.close()
    assert {r["evaluations"] for r in rows} == {5, 10}
    for row in rows:
        job = next(j for j in study.jobs() if j.id == row["id"])
        direct = nstlab.stylize(job.pair.content, job.pair.style, job.config)
        with Image.open(study.folder / row["output"]) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(to_pil(direct.image)))


def _spawn_run(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    # One thread per runner: two 2-thread runners on two cores spin-wait on each other's OpenMP barriers.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    # A runner killed mid-job cannot remove its temporary input folder: keep those inside the test's own
    # folder instead of leaving them in the machine's /tmp.
    scratch = path.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    env["TMPDIR"] = str(scratch)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nstlab.cli",
            "study",
            "run",
            str(path),
            "--smoke",
            "--quiet",
            "--device",
            "cpu",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_resume_after_sigkill(tmp_path: Path) -> None:
    # Long enough jobs (150 evaluations at 64 px) that the kill lands mid-job.
    path = write_study(tmp_path, 'optimizer = ["lbfgs", "adam"]', base="iterations = 30000")
    study = load_study(path, smoke=True)
    assert {j.config.iterations for j in study.jobs()} == {150}
    proc = _spawn_run(path)
    db = store_path(study)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "first job never finished"
            if db.exists():
                with sqlite3.connect(db, timeout=30) as con:
                    done = con.execute("SELECT COUNT(*) FROM jobs WHERE status='done'").fetchone()[0]
                    running = con.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0]
                if done >= 1 and running == 1:
                    break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)  # also when the test fails: never leave a runner behind
        proc.wait()
    store = Store(db)
    assert store.integrity() == "ok"
    before = {r["id"]: r for r in store.rows()}
    store.close()
    finished_before = {i: r["finished"] for i, r in before.items() if r["status"] == "done"}
    killed = [i for i, r in before.items() if r["status"] == "running"]
    assert len(killed) == 1
    proc = _spawn_run(path)
    try:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
    store = Store(db)
    after = {r["id"]: r for r in store.rows()}
    assert store.integrity() == "ok"
    store.close()
    assert all(r["status"] == "done" for r in after.values())
    for i, finished in finished_before.items():  # done jobs were not redone
        assert after[i]["finished"] == finished and after[i]["attempts"] == 1
    assert after[killed[0]]["attempts"] == 2  # the killed job ran again, once


def test_two_concurrent_runners_split_the_work(tmp_path: Path) -> None:
    path = write_study(
        tmp_path, "seed = [0, 1, 2, 3]", base="iterations = 8000", pairs=2
    )  # 8 jobs x 40 evals
    procs = [_spawn_run(path), _spawn_run(path)]
    try:
        for p in procs:
            assert p.wait(timeout=600) == 0, p.stderr.read().decode() if p.stderr else ""
    finally:
        for p in procs:
            p.kill()
    study = load_study(path, smoke=True)
    store = Store(store_path(study))
    rows = store.rows()
    assert store.integrity() == "ok"
    store.close()
    assert len(rows) == 8 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    workers = {r["worker"] for r in rows}
    assert len(workers) == 2, workers  # both runners did part of the work, no job twice


def test_pool_executor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, 'optimizer = ["lbfgs", "adam"]')
    study = load_study(path, smoke=True)
    counts = run_study(study, RunOptions(executor="pool", workers=2, device="cpu"), quiet=False)
    assert counts["done"] == 4
    # Not a terminal: one line per finished job, naming it, as the single-process runner prints.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert sorted(line.split("] ", 1)[1] for line in lines) == [
        "done: p0 · adam",
        "done: p0 · lbfgs",
        "done: p1 · adam",
        "done: p1 · lbfgs",
    ]
    assert sorted(line.split("]")[0] for line in lines) == ["[1/4", "[2/4", "[3/4", "[4/4"]
    store = Store(store_path(study))
    assert all(r["attempts"] == 1 for r in store.rows())
    store.close()


def test_ray_executor_runs_a_smoke_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Two of a pair's three settings go as one batched task (--batch 2), the third alone.
    path = write_study(tmp_path, 'optimizer = ["lbfgs", "adam", "adamw"]')
    study = load_study(path, smoke=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "src")}},
    )
    try:
        counts = run_study(study, RunOptions(executor="ray", device="cpu", batch=2), quiet=True)
        # Nothing left to run: no resource check, no work, same counts.
        assert run_study(study, RunOptions(executor="ray", gpus_per_job=1), quiet=True) == counts
        # A job asking for a GPU this cluster lacks would be queued forever: refused at once instead.
        path.write_text(path.read_text().replace('"adamw"]', '"adamw", { optimizer = "adam", lr = 0.05 }]'))
        with pytest.raises(
            DeviceError, match=r"no node of the Ray cluster can take a job of 1 CPUs and 1 GPUs \(1 live node"
        ):
            run_study(load_study(path, smoke=True), RunOptions(executor="ray", gpus_per_job=1), quiet=True)
        # This process started the cluster (ray.init() above), so it never gains nodes: no
        # --wait-for-resources way out, and that flag is refused too, where it would wait forever.
        for wait in (False, True):
            opts = RunOptions(executor="ray", cpus_per_job=64, wait_for_resources=wait)
            with pytest.raises(DeviceError, match=r"of 64 CPUs and 0 GPUs .*--gpus-per-job$"):
                run_study(load_study(path, smoke=True), opts, quiet=True)
    finally:
        ray.shutdown()  # only our own cluster
    assert counts["done"] == 6
    store = Store(store_path(study))
    rows = store.rows([j.id for j in study.jobs()])  # the added job never ran
    store.close()
    assert all(r["attempts"] == 1 and r["metrics"]["ssim"] <= 1 for r in rows)
    sizes: dict[str, list[int]] = {}
    for r in rows:
        record = json.loads((study.folder / r["record"]).read_text())
        sizes.setdefault(r["pair"], []).append(record["run"].get("batch_size") or 1)
    assert all(sorted(s) == [1, 2, 2] for s in sizes.values()), sizes  # two of a pair's three as one task


# --- checks made before any job runs; what a job's record and metrics say -----------------------------


def test_content_and_style_metrics_and_input_paths_in_records(tmp_path: Path) -> None:
    # The output (64 x 48 in a smoke study) is scored against the content at the output's size, whatever
    # the content file's own size (96 x 72 here); the record names the study's input files, not the
    # worker's temporary copies.
    path = write_study(tmp_path, 'optimizer = ["lbfgs"]', pairs=1)
    path.write_text(path.read_text() + '[metrics]\nnames = ["rmse", "content", "style"]\n')
    study = load_study(path, smoke=True)
    assert run_study(study, RunOptions(device="cpu"), quiet=True)["done"] == 1
    store = Store(store_path(study))
    (row,) = store.rows()
    store.close()
    assert row["metrics"]["content_distance"] >= 0 and row["metrics"]["style_distance"] >= 0
    record = json.loads((study.folder / row["record"]).read_text())
    assert record["inputs"]["content"]["source"] == str(study.pairs[0].content)
    assert record["inputs"]["style"]["source"] == str(study.pairs[0].style)


@pytest.mark.parametrize(
    ("table", "pattern"),
    [
        ('maker = "magneta"', "unknown reference maker.*Did you mean 'magenta'"),
        ("alpha = 5", "alpha must be in \\[0, 1\\]|alpha.*\\[0, 1\\]"),
        ('maker = "folder"', "needs reference_dir"),
        ('maker = "magenta"\ncontent_size = 0', "content_size"),
    ],
)
def test_reference_settings_are_checked_when_the_study_loads(
    tmp_path: Path, table: str, pattern: str
) -> None:
    path = write_study(tmp_path, 'optimizer = ["lbfgs"]', pairs=1)
    path.write_text(path.read_text() + f"[reference]\n{table}\n")
    with pytest.raises(ConfigError, match=pattern):
        load_study(path)


def test_unavailable_device_or_cluster_fails_before_any_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from nstlab.errors import DeviceError

    path = write_study(tmp_path, 'optimizer = ["lbfgs"]', pairs=1)
    study = load_study(path, smoke=True)
    with pytest.raises(InputError, match="is a directory"):
        load_study(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            run_study(study, RunOptions(device="cuda"), quiet=True)
        assert not store_path(study).exists()  # refused before the store was even created
    ray = pytest.importorskip("ray")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", unreachable)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(DeviceError, match="cannot connect to the Ray cluster at 10.0.0.1:6379"):
        run_study(study, RunOptions(executor="ray", address="10.0.0.1:6379"), quiet=True)


def test_ray_capacity_follows_the_scarcer_resource() -> None:
    from nstlab.study.executors import _capacity

    def node(alive: bool = True, **resources: float) -> dict[str, object]:
        return {"Alive": alive, "Resources": resources}

    assert _capacity([node(CPU=16.0, GPU=2.0)], 4, 0) == 4
    assert _capacity([node(CPU=16.0, GPU=2.0)], 4, 1) == 2  # the GPUs bound it
    assert _capacity([node(CPU=0.0, GPU=8.0)], 0, 1) == 8  # GPU-only jobs on GPU nodes without CPUs
    assert _capacity([node(GPU=8.0)], 1, 0) == 0  # nothing fits now (an autoscaler may add nodes)
    # Per node, summed: 8 CPUs on one node and 8 GPUs on another hold no job of 1 CPU + 1 GPU.
    assert _capacity([node(CPU=8.0), node(GPU=8.0)], 1, 1) == 0
    assert _capacity([node(CPU=8.0), node(CPU=4.0, GPU=1.0), node(False, CPU=64.0)], 2, 0) == 6


def test_wait_for_resources_is_refused_for_the_private_local_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local Ray started by this run never gains nodes: waiting would be forever.
    ray = pytest.importorskip("ray")
    shut: list[bool] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    study = load_study(write_study(tmp_path, 'optimizer = ["adam"]', pairs=1), smoke=True)
    for address in (None, "local"):  # "local" starts a new local Ray too
        opts = RunOptions(executor="ray", gpus_per_job=1, wait_for_resources=True, address=address)
        with pytest.raises(DeviceError, match=r"can take a job of 1 CPUs and 1 GPUs .*--gpus-per-job$"):
            run_study(study, opts, quiet=True)
    assert shut == [True, True]


def test_wait_for_resources_on_a_cluster_that_may_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Connected to a cluster this process did not start: refused with the way out, or announced and queued.
    ray = pytest.importorskip("ray")
    from nstlab.study import executors

    class Queued(Exception):
        pass

    def remote(**resources: float) -> object:
        raise Queued(resources)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(executors, "_started_in_process", lambda ray: False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(ray, "remote", remote)
    study = load_study(write_study(tmp_path, 'optimizer = ["adam"]', pairs=1), smoke=True)
    with pytest.raises(DeviceError, match=r"1 CPUs and 1 GPUs .*, or pass --wait-for-resources"):
        run_study(study, RunOptions(executor="ray", gpus_per_job=1), quiet=True)
    with pytest.raises(Queued):
        run_study(study, RunOptions(executor="ray", gpus_per_job=1, wait_for_resources=True), quiet=True)
    assert "waiting for the Ray cluster to add a node with 1 CPUs and 1 GPUs" in capsys.readouterr().err


def test_ray_resource_check_needs_one_node_with_all_of_a_jobs_request() -> None:
    from nstlab.study.executors import _node_fits

    two = [{"Alive": True, "Resources": {"CPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 8.0}}]
    assert _node_fits(two, 8, 0) is None
    # 16 CPUs in all, but Ray places a task on one node: 12 never fits.
    assert _node_fits(two, 12, 0) == "2 live node(s), the largest with 8 CPUs, 0 GPUs"
    split = [
        {"Alive": True, "Resources": {"CPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 0.0, "GPU": 1.0}},
    ]
    assert _node_fits(split, 1, 1) is not None  # the CPU and the GPU are on different nodes
    assert _node_fits(split, 0, 1) is None  # --cpus-per-job 0: a GPU-only job fits the second node
    dead = [{"Alive": False, "Resources": {"CPU": 64.0}}, {"Alive": True, "Resources": {"CPU": 2.0}}]
    assert _node_fits(dead, 4, 0) == "1 live node(s), the largest with 2 CPUs, 0 GPUs"


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"workers": "2"}, ConfigError, "--workers must be an integer >= 1, got '2'"),
        ({"batch": 0}, ConfigError, "--batch must be an integer >= 1"),
        ({"cpus_per_job": -1}, ConfigError, "--cpus-per-job must be a number >= 0"),
        ({"gpus_per_job": float("nan")}, ConfigError, "--gpus-per-job must be a number >= 0"),
        ({"cpus_per_job": 0, "executor": "ray"}, ConfigError, "cannot both be 0"),
        ({"device": "tpu"}, InputError, "unknown device 'tpu'"),
        ({"device": "cuda:x"}, InputError, "unknown device 'cuda:x'|CUDA is not available"),
    ],
)
def test_bad_run_options_are_typed_errors(
    tmp_path: Path, options: dict[str, object], error: type[Exception], pattern: str
) -> None:
    study = load_study(write_study(tmp_path, 'optimizer = ["adam"]', pairs=1), smoke=True)
    with pytest.raises(error, match=pattern):
        run_study(study, RunOptions(**options), quiet=True)  # type: ignore[arg-type]
    assert not store_path(study).exists()


def test_changed_reference_or_metrics_are_refused_once_jobs_are_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nstlab.cli import main

    path = write_study(tmp_path, 'optimizer = ["adam"]', pairs=1)
    original = path.read_text()
    path.write_text(original + '[metrics]\nnames = ["rmse"]\n')
    assert run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)["done"] == 1
    store = Store(store_path(load_study(path, smoke=True)))
    before = store.rows()
    store.close()
    # Another metric set (or reference) would leave the finished job's scores as they were: refused.
    path.write_text(original + '[metrics]\nnames = ["rmse", "ssim"]\n')
    with pytest.raises(ConfigError, match=r"the metrics settings changed since 1 job\(s\) were scored"):
        run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "run", str(path), "--smoke", "--device", "cpu", "--quiet"])
    assert exit_info.value.code == 2
    assert "were scored" in capsys.readouterr().err
    path.write_text(
        original + '[metrics]\nnames = ["rmse"]\n[reference]\nmaker = "folder"\nreference_dir = "."\n'
    )
    with pytest.raises(ConfigError, match="the reference settings changed"):
        run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)
    # Restored: runs (nothing to do) and the stored rows are untouched.
    path.write_text(original + '[metrics]\nnames = ["rmse"]\n')
    assert run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)["done"] == 1
    store = Store(store_path(load_study(path, smoke=True)))
    assert store.rows() == before
    store.close()


def test_unreadable_input_images_stop_the_run_before_any_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nstlab.cli import main
    from nstlab.errors import ImageError

    path = write_study(tmp_path, 'optimizer = ["adam", "adamw"]', pairs=2)
    good = tmp_path / "in1" / "style.png"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated: it exists and has a PNG header
    study = load_study(path, smoke=True)
    with pytest.raises(InputError, match=r"pair p1: style image file .*style.png is truncated or corrupt"):
        run_study(study, RunOptions(device="cpu"), quiet=True)
    store = Store(store_path(study))
    assert {r["status"] for r in store.rows()} == {"pending"}  # no job ran, none failed
    store.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "run", str(path), "--smoke", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pair p1: style" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Only pairs with jobs to run are read. Failed jobs are not run again without --retry-failed: p1's
    # jobs failed (as if its image went bad during a run), so the rerun does not read p1 ...
    from nstlab.study import executors

    with monkeypatch.context() as m:
        m.setattr(executors, "_check_inputs", lambda *args: None)
        counts = run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)
    assert (counts["done"], counts["failed"]) == (2, 2)
    assert run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True) == counts
    # ... but --retry-failed would run them, so it is refused.
    with pytest.raises(ImageError, match="pair p1: style"):
        run_study(load_study(path, smoke=True), RunOptions(device="cpu", retry_failed=True), quiet=True)
    # Left out of the study with pair_names, p1 does not block a new p0 job either.
    path.write_text(path.read_text().replace("pairs = [", 'pair_names = ["p0"]\npairs = [', 1))
    path.write_text(path.read_text().replace('"adamw"]', '"adamw", "lbfgs"]'))
    assert run_study(load_study(path, smoke=True), RunOptions(device="cpu"), quiet=True)["done"] == 3


def test_failures_and_reference_records_name_the_study_files_and_scores_match_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nstlab.cli import main
    from nstlab.study import executors

    path = write_study(tmp_path, 'optimizer = ["adam"]', pairs=2)
    bad = tmp_path / "in1" / "content.png"
    bad.write_text("not an image\n")  # p1's content: its job fails when it loads
    # As if the file went bad after the run's up-front check (a long run, a file replaced meanwhile).
    monkeypatch.setattr(executors, "_check_inputs", lambda *args: None)
    # A cached reference of the same bytes made from other files (an earlier run, another study): the
    # study's record must still name its own files.
    from nstlab.reference import make_reference

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("content.png", "style.png"):
        shutil.copyfile(tmp_path / "in0" / name, elsewhere / name)
    make_reference(elsewhere / "content.png", elsewhere / "style.png", "magenta")
    study = load_study(path, smoke=True)
    counts = run_study(study, RunOptions(device="cpu"), quiet=True)
    assert counts["done"] == 1 and counts["failed"] == 1
    store = Store(store_path(study))
    rows = {r["pair"]: r for r in store.rows()}
    store.close()
    assert str(bad) in rows["p1"]["error"] and "nstlab-job" not in rows["p1"]["error"]
    ref_record = json.loads((study.folder / "references" / "p0.json").read_text())
    assert ref_record["inputs"]["content"]["source"] == str(tmp_path / "in0" / "content.png")
    assert "nstlab-job" not in json.dumps(ref_record)
    # The stored scores are those of the saved 8-bit image: `nstlab evaluate` of the files agrees.
    done = rows["p0"]
    out, ref = study.folder / done["output"], study.folder / done["reference"]["path"]
    report = tmp_path / "eval.json"
    code = main(["evaluate", str(out), str(ref), "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    evaluated = json.loads(report.read_text())["metrics"]
    for name in ("rmse", "psnr", "ssim"):
        assert evaluated[name] == pytest.approx(done["metrics"][name], rel=1e-9, abs=1e-12), name


def test_missing_pretrained_weights_stop_the_run_before_any_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nstlab.errors import WeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache; the suite is offline
    path = write_study(tmp_path, 'optimizer = ["adam", "adamw"]', pairs=1, base="size = 32\niterations = 2")
    study = load_study(path)  # not --smoke: torchvision's weights
    with pytest.raises(WeightsError, match="ResNet-18 ImageNet weights are not cached"):
        run_study(study, RunOptions(device="cpu"), quiet=True)
    store = Store(store_path(study))
    assert {r["status"] for r in store.rows()} == {"pending"}  # no job ran, none failed
    store.close()
    path.write_text(
        path.read_text().replace("iterations = 2", f'iterations = 2\nweights = "{tmp_path / "no.pth"}"')
    )
    with pytest.raises(WeightsError, match="no.pth does not exist"):
        run_study(load_study(path), RunOptions(device="cpu"), quiet=True)


def test_a_real_study_with_random_weights_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nstlab.cli import main

    base = 'weights = "random"\nsize = 32\niterations = 2'
    path = write_study(tmp_path, 'optimizer = ["adam", "adamw"]', pairs=1, base=base)
    assert main(["study", "run", str(path), "--device", "cpu", "--quiet"]) == 0
    assert "WARNING: 2 of 2 jobs use RANDOM weights" in capsys.readouterr().err
    assert main(["study", "run", str(path), "--device", "cpu", "--quiet", "--smoke"]) == 0
    assert (
        "RANDOM" not in capsys.readouterr().err
    )  # --smoke is random by definition; --quiet hides its header


def test_scoring_settings_spelled_otherwise_compare_alike() -> None:
    from nstlab.study.runner import _scoring_view

    a = {"reference": {"maker": "auto", "adain_weights": "w"}, "metrics": ["rmse", "ssim"], "judge": "tv"}
    b = {
        "reference": {"maker": " Auto", "adain_weights": "./w/", "alpha": 1, "content_size": 512},
        "metrics": ["ssim", "rmse"],
        "judge": "other",  # no content/style metric runs the judge
    }
    assert _scoring_view(a) == _scoring_view(b)
    assert _scoring_view(a) != _scoring_view(
        {**a, "reference": {"maker": "auto", "adain_weights": "w", "alpha": 0.5}}
    )
    assert _scoring_view(a) != _scoring_view({**a, "reference": {"maker": "auto", "adain_weights": "../w"}})
    assert _scoring_view(a) != _scoring_view({**a, "metrics": ["rmse"]})
    # ".." is kept: through a symlinked folder, x/../w is not w.
    assert _scoring_view(a) != _scoring_view({**a, "reference": {"maker": "auto", "adain_weights": "x/../w"}})
    # A hand-edited record of the wrong shape is a change, not a crash.
    assert _scoring_view(a) != _scoring_view({**a, "reference": "adain", "metrics": "rmse"})


def test_a_moved_study_folder_is_the_same_study(tmp_path: Path) -> None:
    # [reference] paths are remembered as written (relative to the study file), so moving the folder, or a
    # cluster mounting it elsewhere, does not look like a changed reference.
    first = tmp_path / "a"
    first.mkdir()
    write_pair(first)
    text = (
        'name = "m"\npairs = [{ name = "p0", content = "content.png", style = "style.png" }]\n'
        '[base]\ndevice = "cpu"\nsize = 32\niterations = 2\nweights = "random"\n'
        '[axes]\noptimizer = ["adam"]\n'
        '[reference]\nmaker = "auto"\nadain_weights = "weights"\n[metrics]\nnames = ["rmse"]\n'
    )
    (first / "m.toml").write_text(text)

    def run(folder: Path) -> int:
        return run_study(load_study(folder / "m.toml"), RunOptions(device="cpu"), quiet=True)["done"]

    assert run(first) == 1  # offline: auto falls back to Magenta, recorded
    # A store written before 2026-11-28 holds absolute paths of the folder it was in; then the folder moves.
    study = load_study(first / "m.toml")
    store = Store(store_path(study))
    with store.transaction() as db:
        legacy = {"reference": dict(study.reference), "metrics": ["rmse"], "judge": "torchvision"}
        assert legacy["reference"]["adain_weights"] == str(first / "weights")
        db.execute("UPDATE meta SET value=? WHERE key='scoring'", (json.dumps(legacy),))
    store.close()
    moved = tmp_path / "b"
    first.rename(moved)
    assert load_study(moved / "m.toml").reference["adain_weights"] == str(moved / "weights")  # used resolved
    assert run(moved) == 1
    assert run(moved) == 1  # now stored as written
    # Spelled otherwise, scored alike: not a change.
    alike = text.replace('maker = "auto"', 'maker = "Auto"\nalpha = 1.0').replace('"weights"', '"./weights/"')
    (moved / "m.toml").write_text(alike)
    assert run(moved) == 1
    (moved / "m.toml").write_text(text.replace('maker = "auto"', 'maker = "magenta"'))
    with pytest.raises(ConfigError, match="the reference settings changed"):
        run(moved)  # the maker itself changed
    (moved / "m.toml").write_text(text.replace('adain_weights = "weights"', 'adain_weights = "other"'))
    with pytest.raises(ConfigError, match=r"the reference settings changed .*\"adain_weights\": \"weights\""):
        run(moved)  # auto reads adain_weights: a real change
    # A path the maker does not read does not count: adain_weights with maker = "magenta".
    third = tmp_path / "c"
    third.mkdir()
    write_pair(third)
    magenta = text.replace('maker = "auto"', 'maker = "magenta"')
    (third / "m.toml").write_text(magenta)
    assert run(third) == 1
    (third / "m.toml").write_text(magenta.replace('adain_weights = "weights"', 'adain_weights = "other"'))
    assert run(third) == 1


def test_the_judge_counts_only_when_a_metric_uses_it_and_is_checked_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nstlab.errors import WeightsError

    base = 'size = 32\niterations = 2\nweights = "random"'
    path = write_study(tmp_path, 'optimizer = ["adam"]', pairs=1, base=base)
    original = path.read_text()
    path.write_text(original + '[metrics]\nnames = ["rmse"]\njudge_weights = "judge-a.pth"\n')
    assert run_study(load_study(path), RunOptions(device="cpu"), quiet=True)["done"] == 1
    # No metric runs the judge: another judge file changes no score, so the rerun is not refused.
    path.write_text(original + '[metrics]\nnames = ["rmse"]\njudge_weights = "judge-b.pth"\n')
    assert run_study(load_study(path), RunOptions(device="cpu"), quiet=True)["done"] == 1
    # A content metric needs the judge: its missing weights file (relative to the study file) is one
    # error before any job runs, not a "judge: ..." failure in every job.
    other = write_study(tmp_path / "two", 'optimizer = ["adam"]', pairs=1, base=base)
    other.write_text(other.read_text() + '[metrics]\nnames = ["rmse", "content"]\njudge_weights = "j.pth"\n')
    study = load_study(other)
    with pytest.raises(WeightsError, match=r"\[metrics\] judge .*" + str(tmp_path / "two" / "j.pth")):
        run_study(study, RunOptions(device="cpu"), quiet=True)
    store = Store(store_path(study))
    assert {r["status"] for r in store.rows()} == {"pending"}
    store.close()
    # torchvision's judge weights, not cached and offline: the way out named is judge_weights, not [base].
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    other.write_text(other.read_text().replace('judge_weights = "j.pth"', 'judge_weights = "torchvision"'))
    with pytest.raises(WeightsError) as info:
        run_study(load_study(other), RunOptions(device="cpu"), quiet=True)
    message = str(info.value)
    assert "VGG-19 ImageNet weights are not cached" in message and "Set [metrics] judge_weights" in message
    assert "[base]" not in message and "--weights" not in message


def test_the_weights_check_covers_only_the_jobs_left(tmp_path: Path) -> None:
    from nstlab.features import get_spec

    weights = tmp_path / "resnet18.pth"
    torch.save(get_spec("resnet18").build().state_dict(), weights)  # official key names, random values
    path = write_study(
        tmp_path,
        f'weights = ["{weights}", "random"]',
        pairs=1,
        base='size = 32\niterations = 2\noptimizer = "adam"',
    )
    path.write_text(path.read_text() + '[metrics]\nnames = ["rmse"]\n')
    study = load_study(path)
    counts = run_study(study, RunOptions(device="cpu", max_groups=1), quiet=True)
    assert counts["done"] == 1 and counts["pending"] == 1
    store = Store(store_path(study))
    left = [r["config"]["weights"] for r in store.rows() if r["status"] == "pending"]
    store.close()
    assert left == ["random"]  # the file's job ran first
    weights.unlink()  # e.g. resumed on a machine without that file: only the random-weights job is left
    assert run_study(load_study(path), RunOptions(device="cpu"), quiet=True)["done"] == 2


def test_jobs_a_live_runner_holds_are_not_left_for_this_one(tmp_path: Path) -> None:
    # The up-front checks cover the jobs this runner could take: not those another live runner is running
    # (a second runner on another host is not refused over files it would never read).
    import socket

    from nstlab.study.executors import _jobs_left
    from nstlab.study.runner import sync_store

    study = load_study(write_study(tmp_path, 'optimizer = ["adam", "adamw", "lbfgs"]', pairs=1), smoke=True)
    store, jobs = sync_store(study)
    live, dead, failed = (j.id for j in jobs)
    host, now = socket.gethostname(), time.time()
    with store.transaction() as db:
        db.execute(
            "UPDATE jobs SET status='running', worker=?, heartbeat=? WHERE id=?",
            (f"{host}:{os.getppid()}", now, live),
        )
        db.execute(
            "UPDATE jobs SET status='running', worker=?, heartbeat=? WHERE id=?",
            (f"{host}:999999999", now, dead),
        )
        db.execute("UPDATE jobs SET status='failed' WHERE id=?", (failed,))
    assert [j.id for j in _jobs_left(store, jobs, retry_failed=False)] == [dead]
    assert [j.id for j in _jobs_left(store, jobs, retry_failed=True)] == [dead, failed]
    store.close()


@pytest.mark.parametrize("maker", ["auto", "Auto", " ADAIN "])
def test_smoke_studies_make_magenta_references_however_the_maker_is_spelled(
    tmp_path: Path, maker: str
) -> None:
    # --smoke must never download AdaIN's weights: "auto" and "adain", in any case, become Magenta.
    path = write_study(tmp_path, 'optimizer = ["adam"]', pairs=1)
    path.write_text(path.read_text() + f'[reference]\nmaker = "{maker}"\n')
    assert load_study(path, smoke=True).reference["maker"] == "magenta"
    assert load_study(path).reference["maker"] == maker
