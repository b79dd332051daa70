"""The engine on tiny real configurations: every switch runs, lowers its loss, and behaves as documented."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config

import nstlab
from nstlab.engine import Progress
from nstlab.errors import NonFiniteLossError, StylizeInterrupted

EXTRACTORS = ("vgg16", "vgg19", "resnet18")
OPTIMIZERS = ("lbfgs", "adam", "adamw")
INITS = ("content", "noise", "style")


@pytest.mark.parametrize(
    ("extractor", "optimizer", "init"), list(itertools.product(EXTRACTORS, OPTIMIZERS, INITS))
)
def test_every_combination_runs_and_lowers_its_loss(
    pair: tuple[Path, Path], extractor: str, optimizer: str, init: str
) -> None:
    # 40 evaluations: Adam at the report's lr 0.1 overshoots for its first ~15 steps from a content start.
    cfg = tiny_config(extractor=extractor, optimizer=optimizer, init=init, iterations=40, size=48)
    result = nstlab.stylize(*pair, cfg)
    trace = [t["total"] for t in result.trace]
    assert result.engine.evaluations == 40 and len(trace) == 40
    assert trace[-1] < trace[0], trace
    assert result.image.shape == (1, 3, 36, 48)  # 96x72 content at --size 48
    assert 0.0 <= float(result.image.min()) and float(result.image.max()) <= 1.0
    assert result.record["config"]["extractor"] == extractor


@pytest.mark.parametrize("terms", [("content",), ("style",), ("content", "style"), ("style", "tv")])
def test_loss_term_subsets(pair: tuple[Path, Path], terms: tuple[str, ...]) -> None:
    result = nstlab.stylize(*pair, tiny_config(losses=terms, init="noise"))
    first = result.trace[0]
    assert set(first) == {*terms, "range", "total"}
    assert first["total"] == pytest.approx(sum(first[k] for k in (*terms, "range")), rel=1e-5)


def test_budget_counts_evaluations_not_steps(pair: tuple[Path, Path]) -> None:
    # L-BFGS does up to 20 evaluations per optimiser step; Adam one. Both stop at exactly the budget.
    lbfgs = nstlab.stylize(*pair, tiny_config(iterations=25))
    adam = nstlab.stylize(*pair, tiny_config(iterations=25, optimizer="adam"))
    assert lbfgs.engine.evaluations == adam.engine.evaluations == 25
    assert lbfgs.engine.steps == 2 and adam.engine.steps == 25
    assert lbfgs.record["run"]["optimizer_steps"] == 2 and lbfgs.record["run"]["evaluations"] == 25


def test_learning_rates_default_per_optimiser_and_override(pair: tuple[Path, Path]) -> None:
    assert nstlab.stylize(*pair, tiny_config(optimizer="adam", iterations=1)).engine.optimizer["lr"] == 0.1
    assert nstlab.stylize(*pair, tiny_config(optimizer="adamw", iterations=1)).engine.optimizer["lr"] == 0.01
    assert nstlab.stylize(*pair, tiny_config(iterations=1)).engine.optimizer["lr"] == 1.0
    assert (
        nstlab.stylize(*pair, tiny_config(optimizer="adam", lr=0.3, iterations=1)).engine.optimizer["lr"]
        == 0.3
    )


def test_same_seed_same_pixels(pair: tuple[Path, Path]) -> None:
    for init in ("noise", "content"):
        a = nstlab.stylize(*pair, tiny_config(init=init, seed=3))
        b = nstlab.stylize(*pair, tiny_config(init=init, seed=3))
        assert torch.equal(a.image, b.image)
        assert a.trace == b.trace
    c = nstlab.stylize(*pair, tiny_config(init="noise", seed=4))
    assert not torch.equal(a.image, c.image) or init != "noise"


def test_different_seed_different_noise(pair: tuple[Path, Path]) -> None:
    a = nstlab.stylize(*pair, tiny_config(init="noise", seed=1, iterations=1))
    b = nstlab.stylize(*pair, tiny_config(init="noise", seed=2, iterations=1))
    assert not torch.equal(a.image, b.image)


def test_snapshot_equals_shorter_run(pair: tuple[Path, Path]) -> None:
    # The image after k evaluations of a longer run is exactly what a k-evaluation run returns
    # (this is what lets iteration sweeps reuse one run).
    for optimizer in ("lbfgs", "adam"):
        long = nstlab.stylize(*pair, tiny_config(optimizer=optimizer, iterations=30), snapshot_at=(7, 23))
        for k in (7, 23):
            short = nstlab.stylize(*pair, tiny_config(optimizer=optimizer, iterations=k))
            assert torch.equal(long.engine.snapshots[k], short.image), (optimizer, k)
            assert long.trace[:k] == short.trace


def test_progress_callback(pair: tuple[Path, Path]) -> None:
    seen: list[Progress] = []
    nstlab.stylize(*pair, tiny_config(iterations=5), on_step=seen.append, snapshot_at=(2,))
    assert [p.evaluation for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in seen)
    assert [p.image is not None for p in seen] == [False, True, False, False, False]
    assert {"content", "style", "tv", "range", "total"} <= set(seen[0].losses)


def test_non_finite_loss_stops_with_last_finite_image(pair: tuple[Path, Path]) -> None:
    # A callback that poisons the image after the 3rd evaluation makes the 4th loss NaN.
    def poison(p: Progress) -> None:
        if p.evaluation == 3:
            raise_nan["param"] = True

    raise_nan = {"param": False}
    cfg = tiny_config(optimizer="adam", iterations=10)
    original = nstlab.engine.Objective.terms

    def terms(self: nstlab.engine.Objective, param: torch.Tensor) -> dict[str, torch.Tensor]:
        out = original(self, param)
        if raise_nan["param"]:
            out["style"] = out["style"] * float("nan")
        return out

    nstlab.engine.Objective.terms = terms  # type: ignore[method-assign]
    try:
        with pytest.raises(NonFiniteLossError, match="iteration 4") as info:
            nstlab.stylize(*pair, cfg, on_step=poison)
    finally:
        nstlab.engine.Objective.terms = original  # type: ignore[method-assign]
    res = info.value.result
    assert info.value.evaluation == 4
    assert res.engine.evaluations == 3 and res.engine.stop_reason == "nonfinite"
    assert torch.isfinite(res.image).all()
    assert res.record["run"]["stop_reason"] == "nonfinite"


def test_overflowing_weights_give_non_finite_error(pair: tuple[Path, Path]) -> None:
    # A real overflow, no patching: lambda_style = 1e300 does not fit float32, so the style term is inf.
    with pytest.raises(NonFiniteLossError, match="iteration 1"):
        nstlab.stylize(*pair, tiny_config(style_weight=1e300, init="noise"))


def test_interrupt_keeps_current_image(pair: tuple[Path, Path]) -> None:
    def stop(p: Progress) -> None:
        if p.evaluation == 4:
            raise KeyboardInterrupt

    with pytest.raises(StylizeInterrupted) as info:
        nstlab.stylize(*pair, tiny_config(iterations=50), on_step=stop)
    assert isinstance(info.value, KeyboardInterrupt)
    res = info.value.result
    assert res.engine.evaluations == 4 and res.engine.stop_reason == "interrupted"
    assert len(res.trace) == 4


def test_range_is_kept_without_clamping_the_parameter(pair: tuple[Path, Path]) -> None:
    # A huge Adam step pushes pixels far out of [0, 1]; the returned image is still valid, and the
    # range penalty (not an in-place clamp) is what acts on the parameter.
    res = nstlab.stylize(*pair, tiny_config(optimizer="adam", lr=5.0, iterations=4))
    assert 0.0 <= float(res.image.min()) and float(res.image.max()) <= 1.0
    assert any(t["range"] > 0 for t in res.trace)


def test_api_accepts_pil_images_and_overrides(pair: tuple[Path, Path]) -> None:
    from PIL import Image

    c, s = Image.open(pair[0]).convert("RGB"), Image.open(pair[1]).convert("RGB")
    res = nstlab.stylize(c, s, tiny_config(), iterations=2)
    assert res.engine.evaluations == 2
    assert res.record["inputs"]["content"]["source"].startswith("<in-memory")


def test_shared_pair_runs(shared_pairs: list[tuple[str, Path, Path]]) -> None:
    name, content, style = shared_pairs[0]
    res = nstlab.stylize(content, style, tiny_config(size=96, iterations=5))
    assert max(res.image.shape[-2:]) == 96
    assert res.trace[-1]["total"] < res.trace[0]["total"]


def test_reduced_precision_keeps_grams_losses_and_image_fp32(pair: tuple[Path, Path]) -> None:
    fp32 = nstlab.stylize(*pair, tiny_config(precision="fp32", iterations=3))
    bf16 = nstlab.stylize(*pair, tiny_config(precision="bf16", iterations=3))
    assert fp32.record["run"]["precision"] == "fp32" and bf16.record["run"]["precision"] == "bf16"
    assert nstlab.stylize(*pair, tiny_config(iterations=1)).record["run"]["precision"] == "fp32"  # auto
    assert bf16.image.dtype == torch.float32


def test_bf16_objective_matches_fp32_within_tolerance(pair: tuple[Path, Path]) -> None:
    # One evaluation at the same point: loss terms within 2 %, gradient direction cosine > 0.95 (bf16 keeps
    # 8 mantissa bits; 0.965 measured with random ResNet-18 weights at 96 px).
    from nstlab import images
    from nstlab.api import get_extractor
    from nstlab.engine import Objective

    cfg = tiny_config(size=96)
    content = images.to_tensor(images.resize_long_side(images.load_image(pair[0]), 96))
    style = images.to_tensor(images.resize_long_side(images.load_image(pair[1]), 96))
    extractor = get_extractor(cfg, torch.device("cpu"))
    grads, terms = {}, {}
    for precision in ("fp32", "bf16"):
        objective = Objective(extractor, content, style, cfg.replace(precision=precision))
        param = (content * 0.8 + 0.1).requires_grad_(True)
        t = objective.terms(param)
        torch.stack(list(t.values())).sum().backward()
        assert param.grad is not None and param.grad.dtype == torch.float32
        grads[precision] = param.grad.flatten()
        terms[precision] = {k: float(v.detach()) for k, v in t.items()}
    for key in ("content", "style", "tv"):
        assert terms["bf16"][key] == pytest.approx(terms["fp32"][key], rel=0.02, abs=1e-6), key
    assert float(torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)) > 0.95


def test_coarse_to_fine_runs_each_scale_and_records_it(pair: tuple[Path, Path]) -> None:
    cfg = tiny_config(size=96, scales=(0.5, 1.0), scale_iterations=(5,), iterations=4)
    res = nstlab.stylize(*pair, cfg)
    coarse = res.record["run"]["coarse_scales"]
    assert [c["size"] for c in coarse] == [[48, 36]] and coarse[0]["evaluations"] == 5
    assert res.record["run"]["total_evaluations"] == 9 and res.engine.evaluations == 4
    assert res.image.shape[-2:] == (72, 96)
    # The full-size run starts from the upsampled coarse result, not from the content image.
    plain = nstlab.stylize(*pair, tiny_config(size=96, iterations=4))
    assert res.trace[0]["total"] != plain.trace[0]["total"]


def test_preset_and_scale_validation() -> None:
    from nstlab.config import StylizeConfig
    from nstlab.errors import ConfigError

    fast = StylizeConfig.preset("coarse-to-fine")
    assert fast.scales == (0.25, 0.5, 1.0) and fast.scale_iterations == (300, 200)
    with pytest.raises(ConfigError, match="Did you mean 'coarse-to-fine'"):
        StylizeConfig.preset("coarse-to-fin")
    with pytest.raises(ConfigError, match="ending with 1.0"):
        StylizeConfig(scales=(0.5, 0.25, 1.0), scale_iterations=(1, 1))
    with pytest.raises(ConfigError, match="one budget per coarse scale"):
        StylizeConfig(scales=(0.5, 1.0))


def test_estimate_extrapolates_from_probes(pair: tuple[Path, Path]) -> None:
    from nstlab.api import estimate

    est = estimate(*pair, tiny_config(size=128, iterations=100))
    assert [p["long_side"] for p in est.probes] == [32, 64]
    assert est.peak_memory_bytes > 0 and est.seconds_per_evaluation > 0
    assert est.total_seconds == pytest.approx(est.seconds_per_evaluation * 100)
    assert "GiB" in est.describe()


@pytest.mark.parametrize("extractor", ["vgg19", "resnet18"])
def test_checkpointed_run_equals_plain_run(pair: tuple[Path, Path], extractor: str) -> None:
    # checkpoint="on" changes how memory is spent, not the result: the same loss at the start (float
    # rounding, rel. 1e-5) and, after 8 L-BFGS evaluations (which amplify rounding), images within 1e-3.
    runs = {
        mode: nstlab.stylize(*pair, tiny_config(extractor=extractor, size=64, iterations=8, checkpoint=mode))
        for mode in ("off", "on")
    }
    assert runs["on"].record["run"]["checkpoint"] is True and runs["off"].record["run"]["checkpoint"] is False
    assert runs["on"].trace[0]["total"] == pytest.approx(runs["off"].trace[0]["total"], rel=1e-5)
    assert runs["on"].trace[-1]["total"] == pytest.approx(runs["off"].trace[-1]["total"], rel=1e-3)
    torch.testing.assert_close(runs["on"].image, runs["off"].image, rtol=0, atol=1e-3)


def test_checkpoint_auto_switches_on_by_size() -> None:
    from nstlab.engine import CHECKPOINT_AUTO_PIXELS, resolve_checkpoint

    assert not resolve_checkpoint("auto", 1024 * 768) and resolve_checkpoint("auto", 4096 * 3072)
    assert resolve_checkpoint("auto", CHECKPOINT_AUTO_PIXELS + 1)
    assert resolve_checkpoint("on", 16) and not resolve_checkpoint("off", 4096 * 4096)


def test_memory_options_are_validated() -> None:
    from nstlab.config import StylizeConfig
    from nstlab.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'on'"):
        StylizeConfig(checkpoint="onn")
    with pytest.raises(ConfigError, match="lbfgs_history must be an integer >= 1"):
        StylizeConfig(lbfgs_history=0)


def test_lbfgs_history_is_used_and_too_large_a_state_is_refused(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nstlab import api
    from nstlab.errors import ResourceError
    from nstlab.memory import lbfgs_state_bytes

    res = nstlab.stylize(*pair, tiny_config(iterations=3, lbfgs_history=7))
    assert res.record["optimizer"]["history_size"] == 7
    # Pretend the machine has 1 MiB: a 64x48 image's 100 curvature pairs (7.5 MiB) cannot fit.
    monkeypatch.setattr(api, "total_bytes", lambda device: 2**20)
    with pytest.raises(ResourceError, match=r"--lbfgs-history \d+ .*or --optimizer adam"):
        nstlab.stylize(*pair, tiny_config(iterations=1000))
    assert lbfgs_state_bytes(64 * 48, 100, 1000) == (2 * 100 + 5) * 3 * 64 * 48 * 4
    # Adam keeps two image-sized moments whatever the size: not refused.
    assert nstlab.stylize(*pair, tiny_config(optimizer="adam", iterations=2)).engine.evaluations == 2


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_extractor_matches_eager(pair: tuple[Path, Path]) -> None:
    # torch.compile (opt-in) fuses kernels; the result must equal eager mode up to float rounding. A
    # one-layer extractor keeps the compilation (C++ code generation, minutes for all of ResNet-18 on a
    # loaded 2-core machine) short; the wiring under test is the same for every layer set.
    small = {"size": 48, "iterations": 4, "content_layers": ("conv1",), "style_layers": ("conv1",)}
    eager = nstlab.stylize(*pair, tiny_config(**small))
    compiled = nstlab.stylize(*pair, tiny_config(**small, compile=True))
    assert compiled.record["config"]["compile"] is True
    assert compiled.trace[0]["total"] == pytest.approx(eager.trace[0]["total"], rel=1e-4)
    torch.testing.assert_close(compiled.image, eager.image, rtol=0, atol=1e-3)


def test_compile_failures_and_conflicts_are_clear_errors(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo

    from nstlab.errors import CompileError, ConfigError

    with pytest.raises(ConfigError, match="--checkpoint off"):
        nstlab.stylize(*pair, tiny_config(iterations=1, compile=True, checkpoint="on"))

    class FakeInductorError(torch._dynamo.exc.TorchDynamoException):
        pass

    def broken(module: object) -> object:
        def run(x: torch.Tensor) -> object:
            raise FakeInductorError("InductorError: no working C++ compiler\nlong traceback")

        return run

    from nstlab.api import get_extractor

    extractor = get_extractor(tiny_config(), torch.device("cpu"))
    extractor.__dict__.pop("_nstlab_compiled", None)
    monkeypatch.setattr(torch, "compile", broken)
    expected = r"^torch.compile failed \(InductorError: no working C\+\+ compiler\); run without --compile$"
    try:
        with pytest.raises(CompileError, match=expected):
            nstlab.stylize(*pair, tiny_config(iterations=1, compile=True))
    finally:
        extractor.__dict__.pop("_nstlab_compiled", None)


def test_cuda_backend_flags_are_a_no_op_elsewhere() -> None:
    from nstlab.api import cuda_backend_flags

    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    with cuda_backend_flags(tiny_config(deterministic=True), torch.device("cpu")) as flags:
        assert flags == {}
        assert (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before


@pytest.mark.parametrize("extractor", ["vgg19", "resnet18"])
def test_checkpointed_reduced_precision_keeps_grams_and_losses_fp32(
    pair: tuple[Path, Path], extractor: str
) -> None:
    # Under checkpointing the losses are built while the extractor runs (inside its autocast region);
    # they must still be fp32, and match the plain bf16 pass.
    from nstlab import images
    from nstlab.api import get_extractor
    from nstlab.engine import Objective

    cfg = tiny_config(extractor=extractor, precision="bf16")
    content = images.to_tensor(images.resize_long_side(images.load_image(pair[0]), 64))
    style = images.to_tensor(images.resize_long_side(images.load_image(pair[1]), 64))
    ext = get_extractor(cfg, torch.device("cpu"))
    terms = {}
    for mode in ("off", "on"):
        objective = Objective(ext, content, style, cfg.replace(checkpoint=mode))
        assert all(t.dtype == torch.float32 for t in objective.style_targets.values())
        assert all(t.dtype == torch.float32 for t in objective.content_targets.values())
        param = content.clone().requires_grad_(True)
        t = objective.terms(param)
        assert all(v.dtype == torch.float32 for v in t.values())
        torch.stack(list(t.values())).sum().backward()
        terms[mode] = {k: float(v.detach()) for k, v in t.items()}
    for key in terms["off"]:
        assert terms["on"][key] == pytest.approx(terms["off"][key], rel=1e-3, abs=1e-7), key
