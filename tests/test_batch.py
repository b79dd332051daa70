"""Batched Adam/AdamW runs (nstlab.batch): the same results as separate runs, in the API and in studies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config
from tests.test_study import write_study

import nstlab
from nstlab.batch import batch_key
from nstlab.errors import ConfigError, NonFiniteLossError
from nstlab.study import RunOptions, Store, load_study, run_study, store_path

# Batched convolutions may use other kernels than single-image ones: float rounding differs (1e-6
# measured after 12 Adam steps at 64 px); Adam does not amplify it the way L-BFGS does.
ATOL = 1e-4


def _members() -> list[nstlab.StylizeConfig]:
    return [
        tiny_config(optimizer="adam", iterations=10),
        tiny_config(optimizer="adamw", init="noise", seed=3, iterations=10),
        tiny_config(optimizer="adam", lr=0.05, init="style", losses=("content", "style"), iterations=6),
        tiny_config(optimizer="adam", tv_weight=0.0, style_weight=1e5, iterations=8),
    ]


def test_batch_equals_separate_runs(pair: tuple[Path, Path]) -> None:
    configs = _members()
    snapshots = [(4, 10), (), (6,), ()]
    batch = nstlab.stylize_batch(*pair, configs, snapshot_at=snapshots)
    for cfg, got, snaps in zip(configs, batch, snapshots, strict=True):
        assert isinstance(got, nstlab.Result)
        alone = nstlab.stylize(*pair, cfg)
        assert got.engine.evaluations == alone.engine.evaluations == cfg.iterations
        assert got.record["run"]["batch_size"] == 4
        assert got.record["config"] == alone.record["config"]
        torch.testing.assert_close(got.image, alone.image, rtol=0, atol=ATOL)
        for a, b in zip(got.trace, alone.trace, strict=True):
            assert a["total"] == pytest.approx(b["total"], rel=1e-4)
        assert set(got.engine.snapshots) == set(snaps)
    # A snapshot is the image a shorter separate run returns.
    first = batch[0]
    assert isinstance(first, nstlab.Result)
    shorter = nstlab.stylize(*pair, configs[0].replace(iterations=4))
    torch.testing.assert_close(first.engine.snapshots[4], shorter.image, rtol=0, atol=ATOL)


def test_batch_reports_progress_and_per_member_times(pair: tuple[Path, Path]) -> None:
    seen: list[int] = []
    short, long = tiny_config(optimizer="adam", iterations=2), tiny_config(optimizer="adam", iterations=9)
    out = nstlab.stylize_batch(*pair, [short, long], on_step=lambda p: seen.append(p.evaluation))
    assert seen == list(range(1, 10))  # the study runner's heartbeat and progress bar hang on this
    assert isinstance(out[0], nstlab.Result) and isinstance(out[1], nstlab.Result)
    assert out[0].engine.wall_time_s < out[1].engine.wall_time_s  # each member's own end
    assert out[0].record["run"]["time_and_memory"] == "shared by the batch"


def test_a_broken_member_fails_alone(pair: tuple[Path, Path]) -> None:
    # lambda_style = 1e300 overflows float32: that member stops at iteration 1 as its own run would;
    # the other members finish with their separate runs' results.
    good, bad = tiny_config(optimizer="adam"), tiny_config(optimizer="adamw", style_weight=1e300)
    out = nstlab.stylize_batch(*pair, [good, bad])
    assert isinstance(out[1], NonFiniteLossError) and "iteration 1" in str(out[1])
    assert isinstance(out[0], nstlab.Result)
    torch.testing.assert_close(out[0].image, nstlab.stylize(*pair, good).image, rtol=0, atol=ATOL)


def test_batch_key_and_incompatible_batches(pair: tuple[Path, Path]) -> None:
    adam = tiny_config(optimizer="adam")
    assert batch_key(adam) == batch_key(tiny_config(optimizer="adamw", lr=0.3, init="noise", seed=2))
    assert batch_key(tiny_config()) is None  # L-BFGS is never batched
    assert batch_key(tiny_config(optimizer="adam", scales=(0.5, 1.0), scale_iterations=(2,))) is None
    assert batch_key(tiny_config(optimizer="adam", extractor="vgg16")) != batch_key(adam)
    assert batch_key(tiny_config(optimizer="adam", size=48)) != batch_key(adam)
    with pytest.raises(ConfigError, match="a batch needs Adam/AdamW configs"):
        nstlab.stylize_batch(*pair, [adam, tiny_config()])
    with pytest.raises(ConfigError, match="a batch needs Adam/AdamW configs"):
        nstlab.stylize_batch(*pair, [adam, tiny_config(optimizer="adam", size=48)])


def test_study_batches_give_the_unbatched_results(tmp_path: Path) -> None:
    # Per pair: lbfgs alone, then adam 0.05, adam 0.1 and adamw as one batch of 3 groups (5 and 10
    # evaluations each, from one batched run of 10 with snapshots).
    axes = (
        'optimizer = ["lbfgs", { optimizer = "adam", lr = [0.05, 0.1] }, "adamw"]\niterations = [1000, 2000]'
    )
    results, folders = {}, {}
    for batch in (1, 4):
        study = load_study(write_study(tmp_path / f"b{batch}", axes), smoke=True)
        counts = run_study(study, RunOptions(device="cpu", batch=batch), quiet=True)
        assert counts["done"] == 16
        store = Store(store_path(study))
        results[batch] = {(r["pair"], r["setting"]): r for r in store.rows()}
        assert all(r["attempts"] == 1 for r in store.rows())
        store.close()
        folders[batch] = study.folder
    for key, row in results[4].items():
        plain = results[1][key]
        assert row["evaluations"] == plain["evaluations"]
        assert row["metrics"]["psnr"] == pytest.approx(plain["metrics"]["psnr"], abs=0.05), key
        record = json.loads((folders[4] / row["record"]).read_text())
        assert record["run"].get("batch_size") == (None if key[1].startswith("lbfgs") else 3), key


def test_max_groups_caps_a_batch(tmp_path: Path) -> None:
    axes = 'optimizer = [{ optimizer = "adam", lr = [0.05, 0.1, 0.2] }]'
    study = load_study(write_study(tmp_path, axes, pairs=1), smoke=True)
    counts = run_study(study, RunOptions(device="cpu", batch=3, max_groups=2), quiet=True)
    assert counts["done"] == 2 and counts["pending"] == 1


def test_batch_option_is_validated(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, 'optimizer = ["adam"]', pairs=1), smoke=True)
    with pytest.raises(ConfigError, match="--batch must be >= 1"):
        run_study(study, RunOptions(device="cpu", batch=0), quiet=True)
