"""Metrics against hand computation, scikit-image, and the claims docs/metrics.md makes about the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from conftest import _smooth_image
from nstlab import images, metrics
from nstlab.errors import ConfigError, ImageError, InputError, WeightsError


def smooth(seed: int, size: tuple[int, int] = (48, 40)) -> torch.Tensor:
    return images.to_tensor(_smooth_image(seed, size))


def const(value: float, size: int = 16) -> torch.Tensor:
    return torch.full((1, 3, size, size), value, dtype=torch.float64)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# --- values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_pil", [False, True])
def test_identical_images(as_pil: bool) -> None:
    x = smooth(1)
    a = images.to_pil(x) if as_pil else x
    m = metrics.image_metrics(a, a)
    assert m["mse"] == 0.0 and m["rmse"] == 0.0
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    # (3, H, W) is accepted as well as (1, 3, H, W).
    assert metrics.psnr(x[0], x) == math.inf


def test_constant_images_by_hand() -> None:
    a, b = const(0.3), const(0.4)
    m = metrics.image_metrics(a, b)
    assert m["mse"] == pytest.approx(0.01, rel=1e-12)
    assert m["rmse"] == pytest.approx(0.1, rel=1e-12)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-9)
    # Constant images: variances 0, so SSIM is the luminance term (2*0.3*0.4 + C1) / (0.3^2 + 0.4^2 + C1).
    c1 = 0.01**2
    assert m["ssim"] == pytest.approx((0.24 + c1) / (0.25 + c1), abs=1e-12)
    r = metrics.image_metrics(a, b, convention="report-compat")
    assert r["rmse"] == pytest.approx(0.01, rel=1e-12)  # the "RMSE" column holds the MSE
    assert r["psnr"] == pytest.approx(40.0, abs=1e-9)  # 20 * log10(1 / MSE)
    assert r["mse"] == m["mse"] and r["ssim"] == m["ssim"]
    assert metrics.mse(a, b) == m["mse"] and metrics.rmse(a, b) == m["rmse"]
    assert metrics.psnr(a, b) == m["psnr"] and metrics.ssim(a, b) == m["ssim"]


def _skimage(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    # The very same floats as ours, as (H, W, 3) float64.
    a = x[0].permute(1, 2, 0).double().numpy()
    b = y[0].permute(1, 2, 0).double().numpy()
    ssim = structural_similarity(
        a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    return {
        "mse": float(mean_squared_error(a, b)),
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(ssim),
    }


def _assert_matches_skimage(x: torch.Tensor, y: torch.Tensor) -> None:
    ours, ref = metrics.image_metrics(x, y), _skimage(x, y)
    # Measured on the shared pairs: |d ssim| < 1e-14, |d psnr| < 2e-15 dB, |d mse| < 3e-17. Both use the
    # same 11-tap Gaussian and average over the same "valid" region (skimage crops 5 px of its reflected
    # border), so only float64 rounding separates them; the asserted bounds leave room for other BLAS.
    assert ours["ssim"] == pytest.approx(ref["ssim"], abs=1e-9)
    assert ours["psnr"] == pytest.approx(ref["psnr"], abs=1e-9)
    assert ours["mse"] == pytest.approx(ref["mse"], abs=1e-12)


@pytest.mark.parametrize("size", [(48, 40), (11, 11), (37, 64)])
def test_agrees_with_skimage_synthetic(size: tuple[int, int]) -> None:
    x = smooth(1, size)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    _assert_matches_skimage(x, noisy)
    _assert_matches_skimage(x, smooth(2, size))


def test_agrees_with_skimage_on_shared_pairs(shared_pairs: list[tuple[str, Path, Path]]) -> None:
    for _, content_path, style_path in shared_pairs:
        photo = images.resize_long_side(images.load_image(content_path), 128)  # 128 px keeps this fast
        w, h = photo.size
        copy = photo.resize((w // 2, h // 2), Image.Resampling.BILINEAR).resize(
            (w, h), Image.Resampling.BICUBIC
        )
        style = images.resize_to(images.load_image(style_path), photo.size)
        x = images.to_tensor(photo)
        _assert_matches_skimage(x, images.to_tensor(copy))
        _assert_matches_skimage(x, images.to_tensor(style))


def test_ssim_passes_data_range_one() -> None:
    # With pytorch-msssim's default data_range=255, C1 and C2 would swamp the statistics and SSIM -> 1.
    x, y = smooth(1), smooth(2)
    assert metrics.ssim(x, y) < 0.9


# --- errors --------------------------------------------------------------------------------------------


def test_size_mismatch_names_both_sizes_and_the_fix() -> None:
    out, ref = smooth(1, (48, 40)), smooth(2, (64, 50))
    with pytest.raises(InputError) as exc:
        metrics.image_metrics(out, ref)
    msg = one_line(exc)
    assert "48×40" in msg and "64×50" in msg and "align_to" in msg
    aligned = metrics.align_to(ref, (48, 40))
    assert aligned.shape == (1, 3, 40, 48) and 0.0 <= float(aligned.min()) <= float(aligned.max()) <= 1.0
    assert metrics.align_to(ref, out).shape == out.shape  # the target may be given as an image
    assert metrics.align_to(images.to_pil(ref), out).shape == out.shape  # PIL goes through images.resize_to
    assert math.isfinite(metrics.psnr(out, aligned))


@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_channel_count(channels: int) -> None:
    with pytest.raises(InputError) as exc:
        metrics.mse(torch.rand(1, channels, 16, 16), torch.rand(1, channels, 16, 16))
    assert f"{channels} channels" in one_line(exc)


@pytest.mark.parametrize("low, high", [(-0.1, 1.0), (0.0, 1.5), (0.0, 255.0)])
def test_out_of_range_values(low: float, high: float) -> None:
    x = torch.rand(1, 3, 16, 16) * (high - low) + low
    x[0, 0, 0, 0], x[0, 0, 0, 1] = low, high
    with pytest.raises(InputError) as exc:
        metrics.mse(x, torch.rand(1, 3, 16, 16))
    assert "[0, 1]" in one_line(exc)


def test_rounding_excursions_are_tolerated() -> None:
    x = const(0.5)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -5e-7, 1 + 5e-7
    assert metrics.mse(x, const(0.5)) == pytest.approx(2 * 0.5**2 / x.numel())


@pytest.mark.parametrize(
    "bad",
    [
        torch.full((1, 3, 16, 16), float("nan")),
        torch.zeros(1, 3, 16, 16, dtype=torch.uint8),
        torch.rand(2, 3, 16, 16),
        torch.rand(16, 16),
    ],
)
def test_other_bad_tensors(bad: torch.Tensor) -> None:
    with pytest.raises(InputError) as exc:
        metrics.mse(bad, torch.rand(1, 3, 16, 16))
    one_line(exc)


def test_too_small_for_ssim() -> None:
    x, y = torch.rand(1, 3, 10, 20), torch.rand(1, 3, 10, 20)
    assert metrics.mse(x, y) > 0  # MSE has no window and works
    for fn in (metrics.ssim, metrics.image_metrics):
        with pytest.raises(ImageError) as exc:
            fn(x, y)
        assert "11 px" in one_line(exc)


def test_unknown_convention() -> None:
    with pytest.raises(ConfigError) as exc:
        metrics.image_metrics(const(0.3), const(0.4), convention="report_compat")
    msg = one_line(exc)
    assert "standard, report-compat" in msg and "Did you mean 'report-compat'" in msg


# --- aggregation ---------------------------------------------------------------------------------------


def test_aggregate_by_hand() -> None:
    rows: list[dict[str, float | bool | None]] = [
        {"mse": 0.01, "psnr": 20.0, "judge_random_weights": None},
        {"mse": 0.04, "psnr": 10 * math.log10(25), "judge_random_weights": True},
    ]
    agg = metrics.aggregate(rows)
    assert agg["mse"]["mean"] == pytest.approx(0.025)
    # Sample std (ddof=1): deviations +-0.015 -> sqrt(2 * 0.015^2 / 1)
    assert agg["mse"]["std"] == pytest.approx(math.sqrt(2 * 0.015**2))
    assert agg["mse"]["n"] == 2
    assert agg["psnr"]["mean"] == pytest.approx((20 + 13.979400086720377) / 2)
    assert agg["psnr_of_mean_mse"]["value"] == pytest.approx(10 * math.log10(1 / 0.025))
    # Jensen: the mean of per-image PSNRs is at least the PSNR of the mean MSE.
    assert agg["psnr"]["mean"] > agg["psnr_of_mean_mse"]["value"]
    assert "judge_random_weights" not in agg  # flags are not metrics
    assert metrics.TABLE_PSNR == "mean_of_per_image"


def test_aggregate_single_row_and_missing_metrics() -> None:
    agg = metrics.aggregate([{"ssim": 0.5}, {"ssim": 0.7, "lpips": 0.2}])
    assert agg["lpips"] == {"n": 1.0, "mean": 0.2, "std": 0.0}
    assert agg["ssim"]["n"] == 2 and "psnr_of_mean_mse" not in agg


def test_aggregate_infinite_psnr() -> None:
    agg = metrics.aggregate([{"psnr": math.inf, "mse": 0.0}, {"psnr": 20.0, "mse": 0.01}])
    assert agg["psnr"]["mean"] == math.inf and agg["psnr"]["std"] == math.inf and agg["psnr"]["n_inf"] == 1
    assert not any(math.isnan(v) for stats in agg.values() for v in stats.values())
    assert agg["psnr_of_mean_mse"]["value"] == pytest.approx(10 * math.log10(1 / 0.005))
    same = metrics.aggregate([{"psnr": math.inf, "mse": 0.0}] * 3)
    assert same["psnr"] == {"n": 3.0, "mean": math.inf, "std": 0.0, "n_inf": 3.0}
    assert same["psnr_of_mean_mse"]["value"] == math.inf
    # End to end: identical pairs aggregate without NaN.
    x = smooth(1)
    rows = [metrics.image_metrics(x, x), metrics.image_metrics(x, smooth(2))]
    assert metrics.aggregate(rows)["psnr"]["mean"] == math.inf


def test_aggregate_errors() -> None:
    with pytest.raises(InputError):
        metrics.aggregate([])
    with pytest.raises(InputError) as exc:
        metrics.aggregate([{"ssim": 0.5}, {"ssim": math.nan}])
    assert "row 1" in one_line(exc)


def test_format_table() -> None:
    row = metrics.evaluate_pair(const(0.3), const(0.4))
    text = metrics.format_table(row)
    for label in ("RMSE ↓", "PSNR (dB) ↑", "SSIM ↑", "MSE ↓"):
        assert label in text
    assert "20.000" in text and "0.1" in text
    assert text.index("RMSE") < text.index("PSNR") < text.index("SSIM")
    compat = metrics.format_table(metrics.evaluate_pair(const(0.3), const(0.4), convention="report-compat"))
    assert "40.000" in compat and "report-compat" in compat
    full = metrics.format_table(
        {"psnr": math.inf, "content_distance": 1.5, "style_distance": 2e-7, "lpips": 0.1, "extra": 3.0}
    )
    for label in ("content ↓", "style ↓", "LPIPS ↓", "extra", "inf"):
        assert label in full


# --- the report's numbers (docs/metrics.md) -------------------------------------------------------------

# (column label, "RMSE" row, "PSNR" row) of the report's two tables.
REPORT = [
    ("LBFGS / 1000", 0.01187, 38.528),
    ("Adam", 0.01270, 38.001),
    ("AdamW", 0.01238, 38.235),
    ("1500", 0.01191, 38.504),
    ("2000", 0.01191, 38.501),
]


def test_report_analysis_numbers() -> None:
    x = 0.01187
    assert 20 * math.log10(1 / x) == pytest.approx(38.511, abs=5e-4)  # = 10*log10(1/x^2)
    assert math.sqrt(x) == pytest.approx(0.1089, abs=5e-5)  # the true RMSE if x is an MSE
    assert 10 * math.log10(1 / x) == pytest.approx(19.255, abs=5e-4)  # the true PSNR if x is an MSE
    assert 20 * math.log10(1 / 0.01270) == pytest.approx(37.924, abs=5e-4)
    assert 20 * math.log10(1 / 0.01238) == pytest.approx(38.146, abs=5e-4)
    for _, value, reported in REPORT:
        # The reported PSNR always exceeds 20*log10(1/mean) by a little: a mean of per-image PSNRs.
        gap = reported - 20 * math.log10(1 / value)
        assert 0 < gap < 0.1


def test_report_compat_reproduces_a_report_row() -> None:
    # Two constant images whose MSE is exactly the report's 0.01187.
    a, b = const(0.5), const(0.5 + math.sqrt(0.01187))
    compat = metrics.image_metrics(a, b, convention="report-compat")
    assert compat["rmse"] == pytest.approx(0.01187, rel=1e-9)
    assert compat["psnr"] == pytest.approx(38.511, abs=5e-4)
    standard = metrics.image_metrics(a, b)
    assert standard["rmse"] == pytest.approx(0.1089, abs=5e-5)
    assert standard["psnr"] == pytest.approx(19.255, abs=5e-4)


def test_jensen_gap_of_per_image_psnr() -> None:
    # Per-image values spread around a mean: the mean of 20*log10(1/x_i) exceeds 20*log10(1/mean x).
    values = [0.0105, 0.0112, 0.0119, 0.0126, 0.0132]
    per_image = sum(20 * math.log10(1 / v) for v in values) / len(values)
    assert 0 < per_image - 20 * math.log10(1 / (sum(values) / len(values))) < 0.1


# --- judge: content and style distances ----------------------------------------------------------------


@pytest.fixture(scope="module")
def judge() -> metrics.Judge:
    return metrics.make_judge(weights="random")


def test_judge_layers_and_weights(judge: metrics.Judge) -> None:
    assert judge.content_layers == ("relu4_2",)
    assert judge.style_layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    assert judge.weights.random


def test_content_distance(judge: metrics.Judge) -> None:
    x, y = smooth(1, (64, 64)), smooth(2, (64, 64))
    assert metrics.content_distance(x, x, judge) == 0.0
    assert metrics.content_distance(x, y, judge) > 0.0
    with pytest.raises(InputError):
        metrics.content_distance(x, smooth(2, (48, 64)), judge)
    with pytest.raises(ImageError) as exc:
        metrics.content_distance(smooth(1, (12, 12)), smooth(2, (12, 12)), judge)
    assert "16 px" in one_line(exc)


def _periodic_texture(seed: int, n: int) -> torch.Tensor:
    # Sinusoids with whole periods across the image: tiling it 2x2 introduces no seams.
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    img = torch.zeros(3, n, n)
    for c in range(3):
        for _ in range(6):
            fx, fy = torch.randint(1, 8, (2,), generator=g).tolist()
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            img[c] += torch.sin(2 * math.pi * (fx * xx + fy * yy) / n + phase)
    return ((img - img.min()) / (img.max() - img.min())).unsqueeze(0)


def test_style_distance(judge: metrics.Judge) -> None:
    out = smooth(1, (64, 64))
    style, other = _periodic_texture(2, 64), _periodic_texture(5, 64)
    tiled = style.repeat(1, 1, 2, 2)  # 128x128: a different size is fine, Grams are size-normalised
    assert metrics.style_distance(style, style, judge) == 0.0
    d, d_tiled, d_other = (metrics.style_distance(out, s, judge) for s in (style, tiled, other))
    assert d > 0 and d_other > 0
    # Only the zero-padded image border differs between the two (measured: 2.2% at 64 px, 1.2% at 128 px),
    # while another texture changes the distance by tens of percent.
    assert abs(d_tiled - d) / d < 0.05
    assert abs(d_other - d) / d > 0.2


def test_evaluate_pair(judge: metrics.Judge) -> None:
    x, y = smooth(1, (64, 64)), smooth(2, (64, 64))
    row = metrics.evaluate_pair(x, y, content=y, style=_periodic_texture(2, 80), judge=judge)
    assert row["judge_random_weights"] is True and row["report_compat"] is False
    assert row["content_distance"] == metrics.content_distance(x, y, judge)
    assert isinstance(row["style_distance"], float) and row["style_distance"] > 0
    assert row["psnr"] == metrics.psnr(x, y)
    plain = metrics.evaluate_pair(x, y)  # no judge needed, none built
    assert plain["judge_random_weights"] is None and "content_distance" not in plain
    assert "judge has random weights" in metrics.format_table(row)


# --- LPIPS ---------------------------------------------------------------------------------------------


def test_lpips_without_cached_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    x = smooth(1)
    for net, filename in (("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")):
        with pytest.raises(WeightsError) as exc:
            metrics.lpips_distance(x, x, net=net)
        assert isinstance(exc.value, metrics.LpipsWeightsError)
        assert str(tmp_path / "checkpoints" / filename) in one_line(exc)
    with pytest.raises(ConfigError):
        metrics.lpips_distance(x, x, net="squeeze")
    small = smooth(1, (30, 40))  # AlexNet's first conv and poolings need 31 px
    with pytest.raises(ImageError) as exc:
        metrics.lpips_distance(small, small)
    assert "31 px" in one_line(exc)


def test_lpips_with_cached_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import alexnet

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    state = alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")

    x, y = smooth(1, (64, 64)), smooth(2, (64, 64))
    assert metrics.lpips_distance(x, x) == 0.0
    assert metrics.lpips_distance(x, y) > 0.0
    # The trunk really holds the cached file's weights (lpips' slice3.6 is torchvision's features.6).
    trunk = metrics._lpips_model("alex").net
    assert isinstance(trunk, torch.nn.Module)
    assert torch.equal(getattr(trunk.slice3, "6").weight, state["features.6.weight"])
    row = metrics.evaluate_pair(x, y, lpips_net="alex")
    assert row["lpips"] == metrics.lpips_distance(x, y)


def test_lpips_rejects_a_foreign_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"weight": torch.zeros(1)}, tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    with pytest.raises(metrics.LpipsWeightsError) as exc:
        metrics.lpips_distance(smooth(1), smooth(2))
    one_line(exc)


def test_align_to_float_tensor_keeps_precision() -> None:
    # Float Lanczos (no 8-bit rounding): a constant image stays exactly that constant.
    x = torch.full((1, 3, 20, 30), 0.123456)
    out = metrics.align_to(x, (15, 10))
    assert out.shape == (1, 3, 10, 15)
    assert np.allclose(out.numpy(), 0.123456, atol=1e-6)
