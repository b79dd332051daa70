"""The stylisation engine: optimise an image so its features match the content and its Grams the style.

Pure computation: tensors in, tensors out. No printing and no file I/O; progress goes to a callback.

Objective (Gatys et al. 2015, Eq. 7, plus TV):
    L(p) = lambda_c * L_content(x) + lambda_s * L_style(x) + lambda_tv * L_tv(x) + mu * L_range(p),
    x = clamp(p, 0, 1)
where p is the optimised parameter. Keeping pixels valid by clamping p in place after each step (as many
implementations do) changes the iterate behind the optimiser's back and invalidates L-BFGS's curvature
pairs (s_k, y_k). Instead the objective itself is a fixed, continuous function of p: the network sees the
clamped image, and a quadratic penalty mu * mean((p - clamp(p))^2) pulls escaped pixels back. The same
objective is used for every optimiser so the ablation compares optimisers, not constraint schemes.

Budget: one iteration = one objective evaluation (forward + backward), for every optimiser, so that a
1000-iteration L-BFGS run and a 1000-iteration Adam run cost the same. The returned image is the iterate of
the last evaluation, so its loss is the last entry of the trace; the image after k evaluations of a longer
run is therefore exactly the image a k-evaluation run returns.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nstlab import losses
from nstlab.config import StylizeConfig
from nstlab.errors import CompileError, ConfigError, NonFiniteLossError, StylizeInterrupted
from nstlab.features import FeatureExtractor
from nstlab.optim import make_optimizer, optimizer_settings

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision that runs. ``auto`` is fp32: bf16 autocast is much faster on CPUs with AMX and on
    recent GPUs, but ``auto`` may only pick it once a parity benchmark on the shared pairs shows the result
    equivalent (benchmarks/precision_parity.py; criterion in benchmarks/README.md). Until then, opt in with
    ``precision="bf16"``."""
    del device  # the rule does not depend on the device yet; kept so a measured rule can use it
    return "fp32" if precision == "auto" else precision


def resolve_checkpoint(setting: str, pixels: int) -> bool:
    """Whether activation checkpointing runs: "on", "off", or "auto" = on above CHECKPOINT_AUTO_PIXELS.
    It gives the same result up to float rounding (tests/test_engine.py), so "auto" may switch it by size."""
    return setting == "on" or (setting == "auto" and pixels > CHECKPOINT_AUTO_PIXELS)


def check_compile(cfg: StylizeConfig, pixels: int) -> None:
    """ConfigError if ``compile`` meets activation checkpointing (as resolved for ``pixels``)."""
    if cfg.compile and resolve_checkpoint(cfg.checkpoint, pixels):
        raise ConfigError(
            "compile does not combine with activation checkpointing, which checkpoint=auto turns on "
            f"above {CHECKPOINT_AUTO_PIXELS} pixels; pass --checkpoint off or leave out --compile"
        )


# Above 2048 x 2048 pixels the whole-network activations of VGG-19 reach ~10 GiB (1.8 GiB growth measured
# at 1024 x 768, linear in pixels); from there on, recomputing costs (~1.5x per evaluation) less than the
# memory most machines lack. benchmarks/README.md has the measurements.
CHECKPOINT_AUTO_PIXELS = 2048 * 2048


# mu above. Large enough that a pixel pushed out of [0, 1] is pulled back within a few steps, small enough
# that the objective stays well conditioned near the box boundary.
RANGE_WEIGHT = 1e3


@dataclass(frozen=True)
class Progress:
    """What the engine reports after each evaluation."""

    evaluation: int  # 1-based count of objective evaluations so far
    total: int  # the evaluation budget
    step: int  # optimiser .step() calls so far
    losses: dict[str, float]  # weighted terms and "total"
    elapsed: float  # seconds since optimisation started
    image: Tensor | None = None  # the current image (1, 3, H, W) on the CPU, only at requested snapshots


@dataclass
class EngineResult:
    image: Tensor  # (1, 3, H, W) float32 in [0, 1], on the CPU
    trace: list[dict[str, float]]
    evaluations: int
    steps: int
    stop_reason: str  # "budget" | "converged" | "nonfinite" | "interrupted"
    wall_time_s: float
    optimizer: dict[str, Any]
    precision: str = "fp32"
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    checkpoint: bool = False


class _BudgetSpent(Exception):
    """Raised by the closure instead of evaluating past the budget; ends an L-BFGS step cleanly."""


class NonFiniteEvaluation(Exception):
    """An evaluation's total was NaN/inf (raised before backward); optimize() turns it into
    NonFiniteLossError with the last finite image."""

    def __init__(self, losses: dict[str, float]) -> None:
        super().__init__()
        self.losses = losses


class Objective:
    """Targets computed once; ``terms(p)`` gives the weighted loss terms at parameter ``p``."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        content: Tensor,
        style: Tensor,
        cfg: StylizeConfig,
        *,
        targets: Objective | None = None,
    ) -> None:
        """``targets``: take the targets from that objective (same extractor, layers, images and
        precision) instead of computing them again; a batch of runs on one pair shares them."""
        cfg = cfg.resolved()
        self.precision = resolve_precision(cfg.precision, content.device)
        self.autocast_dtype = _DTYPES.get(self.precision)
        pixels = content.shape[-2] * content.shape[-1]
        check_compile(cfg, pixels)
        self.checkpoint = resolve_checkpoint(cfg.checkpoint, pixels)
        self.compiled = cfg.compile
        self._extract: Callable[[Tensor], dict[str, Tensor]] = (
            _compiled(extractor) if cfg.compile else extractor
        )
        assert cfg.content_layers is not None and cfg.style_layers is not None
        assert cfg.style_layer_weights is not None
        self.extractor = extractor
        self.cfg = cfg
        self.use = set(cfg.losses)
        self.content_layers = cfg.content_layers if "content" in self.use else ()
        self.style_weights = dict(zip(cfg.style_layers, cfg.style_layer_weights, strict=True))
        if "style" not in self.use:
            self.style_weights = {}
        # clone(): targets must be ordinary fp32 tensors, detached from anything that could be reused.
        # One image at a time, each layer reduced to its target as soon as it is computed: at 4096 px the
        # content image's relu1_1 alone is 3 GiB, and must not be alive while the style image runs.
        self.content_targets: dict[str, Tensor] = {}
        self.style_targets: dict[str, Tensor] = {}

        def content_target(name: str, feature: Tensor) -> None:
            if name in self.content_layers:
                self.content_targets[name] = feature.detach().float().clone()

        def style_target(name: str, feature: Tensor) -> None:
            if name in self.style_weights:
                self.style_targets[name] = losses.gram_matrix(feature).detach().clone()

        if targets is not None:
            self.content_targets = {k: targets.content_targets[k] for k in self.content_layers}
            self.style_targets = {k: targets.style_targets[k] for k in self.style_weights}
            return
        with torch.no_grad():
            for image, wanted, target in (
                (content, self.content_layers, content_target),
                (style, self.style_weights, style_target),
            ):
                if not wanted:
                    continue
                if self.checkpoint:
                    self.features(image, target, keep=False)
                else:
                    for name, feature in self.features(image).items():
                        target(name, feature)

    def features(
        self, x: Tensor, on_feature: Callable[[str, Tensor], None] | None = None, keep: bool = True
    ) -> dict[str, Tensor]:
        """Extractor activations, under autocast when a reduced precision is selected (convolutions only:
        gram_matrix and the losses upcast to fp32); checkpointed when ``self.checkpoint``."""
        region = (
            contextlib.nullcontext()
            if self.autocast_dtype is None
            else torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
        )
        if on_feature is not None and self.autocast_dtype is not None:
            # Losses built while the extractor runs must not fall under its autocast: Gram matrices and
            # losses stay fp32 (an fp16 Gram overflows).
            inner = on_feature

            def on_feature(name: str, feature: Tensor) -> None:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    inner(name, feature)

        with region:
            if self.compiled:
                try:
                    feats: dict[str, Tensor] = self._extract(x)
                except torch._dynamo.exc.TorchDynamoException as exc:  # compilation failed (InductorError...)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    msg = f"torch.compile failed ({first[:300]}); run without --compile"
                    raise CompileError(msg) from None
            else:
                feats = self.extractor(
                    x, checkpoint_segments=self.checkpoint, on_feature=on_feature, keep=keep
                )
        return feats

    def terms(self, param: Tensor) -> dict[str, Tensor]:
        x = param.clamp(0.0, 1.0)
        content_parts: list[Tensor] = []
        grams: dict[str, Tensor] = {}

        def layer_losses(name: str, feature: Tensor) -> None:
            # Checkpointed pass: each layer's loss is built as soon as its activation exists (see
            # FeatureExtractor.forward).
            if name in self.content_layers:
                content_parts.append(losses.content_loss(feature, self.content_targets[name]))
            if name in self.style_weights:
                grams[name] = losses.gram_matrix(feature)

        if self.content_layers or self.style_weights:
            feats = self.features(x, layer_losses if self.checkpoint else None)
            if not self.checkpoint:
                return self.terms_from_features(param, x, feats)
            del feats
        return self._combine(param, x, content_parts, grams)

    def terms_from_features(self, param: Tensor, x: Tensor, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The terms at ``param`` (clamped: ``x``) given its activations (e.g. its slice of a batch)."""
        content_parts = [losses.content_loss(feats[k], self.content_targets[k]) for k in self.content_layers]
        grams = {k: losses.gram_matrix(feats[k]) for k in self.style_weights}
        return self._combine(param, x, content_parts, grams)

    def _combine(
        self, param: Tensor, x: Tensor, content_parts: list[Tensor], grams: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.content_layers:
            out["content"] = self.cfg.content_weight * sum(content_parts, torch.zeros((), device=x.device))
        if self.style_weights:
            out["style"] = self.cfg.style_weight * losses.style_loss(
                grams, self.style_targets, self.style_weights
            )
        if "tv" in self.use:
            out["tv"] = self.cfg.tv_weight * losses.tv_loss(x)
        out["range"] = RANGE_WEIGHT * losses.range_penalty(param)
        return out


def _compiled(extractor: FeatureExtractor) -> Callable[[Tensor], dict[str, Tensor]]:
    # One compiled wrapper per extractor, kept on the extractor (so it lives exactly as long), so that runs
    # after the first reuse its compiled graphs. object.__setattr__: not registered as a submodule.
    compiled: Callable[[Tensor], dict[str, Tensor]] | None = extractor.__dict__.get("_nstlab_compiled")
    if compiled is None:
        compiled = torch.compile(extractor)
        object.__setattr__(extractor, "_nstlab_compiled", compiled)
    return compiled


def initial_image(cfg: StylizeConfig, content: Tensor, style: Tensor) -> Tensor:
    """The starting point: the content image, seeded uniform noise, or the style image at content size."""
    if cfg.init == "content":
        return content.detach().clone()
    if cfg.init == "noise":
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    h, w = content.shape[-2:]
    resized = F.interpolate(style, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0).contiguous()


def loss_values(runs: Sequence[dict[str, Tensor]]) -> tuple[list[dict[str, float]], list[Tensor]]:
    """For each run's weighted terms: their numbers plus "total" (one host sync for every run's numbers
    together) and the total as a tensor, for backward."""
    stacked = [torch.stack(list(terms.values())) for terms in runs]
    totals = [s.sum() for s in stacked]
    parts = [torch.cat([s.detach(), t.detach().reshape(1)]) for s, t in zip(stacked, totals, strict=True)]
    numbers = torch.cat(parts).tolist()
    values, offset = [], 0
    for terms in runs:
        values.append(dict(zip([*terms, "total"], numbers[offset : offset + len(terms) + 1], strict=True)))
        offset += len(terms) + 1
    return values, totals


def evaluate_objective(objective: Objective, param: Tensor) -> tuple[dict[str, float], Tensor]:
    """One evaluation: the weighted terms at ``param`` and their total as numbers, then backward into
    ``param.grad``. Raises NonFiniteEvaluation, before backward, on a NaN or infinite total. Returns the
    numbers and the (detached) total."""
    ([values], [total]) = loss_values([objective.terms(param)])
    if not math.isfinite(values["total"]):
        raise NonFiniteEvaluation(values)
    total.backward()  # type: ignore[no-untyped-call]
    return values, total.detach()


def optimize(
    extractor: FeatureExtractor,
    content: Tensor,
    style: Tensor,
    cfg: StylizeConfig,
    *,
    on_step: Callable[[Progress], None] | None = None,
    snapshot_at: Collection[int] = (),
    init: Tensor | None = None,
    objective: Objective | None = None,
    evaluate: Callable[[Objective, Tensor], tuple[dict[str, float], Tensor]] | None = None,
) -> EngineResult:
    """Run the optimisation. ``content`` and ``style`` are (1, 3, H, W) tensors in [0, 1] on one device.

    Raises NonFiniteLossError (with the last finite image in ``.result``) when the loss becomes NaN/inf and
    StylizeInterrupted (with the current image in ``.result``) on Ctrl-C. ``init`` overrides ``cfg.init``
    with a given starting image (coarse-to-fine passes the upsampled coarse result).

    ``objective`` (built for ``cfg``, e.g. with shared targets) and ``evaluate`` (default
    :func:`evaluate_objective`) let a batch of runs share their evaluations (:mod:`nstlab.batch`); every
    other step is this function's own, so a batch member does exactly what a separate run does.
    """
    cfg = cfg.resolved()
    assert cfg.lr is not None
    torch.manual_seed(cfg.seed)
    if objective is None:
        objective = Objective(extractor, content, style, cfg)
    evaluate = evaluate or evaluate_objective
    # A contiguous NCHW leaf: L-BFGS flattens gradients with .view(-1), which fails on other layouts.
    start_image = initial_image(cfg, content, style) if init is None else init.detach().clone()
    param = start_image.contiguous().requires_grad_(True)
    opt = make_optimizer(cfg.optimizer, param, cfg.lr, cfg.lbfgs_history, cfg.lbfgs_impl)
    budget = cfg.iterations
    snapshots_wanted = set(snapshot_at)
    trace: list[dict[str, float]] = []
    snapshots: dict[int, Tensor] = {}
    state = {"evals": 0, "steps": 0}
    # Kept on the optimisation device (a device-to-host copy every evaluation would sync a GPU each time);
    # moved to the CPU only for snapshots and the result.
    last_image = param.detach().clamp(0.0, 1.0)
    start = time.perf_counter()

    def closure() -> Tensor:
        nonlocal last_image
        if state["evals"] >= budget:
            raise _BudgetSpent
        opt.zero_grad(set_to_none=True)
        values, total = evaluate(objective, param)
        state["evals"] += 1
        n = state["evals"]
        trace.append(values)
        # The image this evaluation scored; what we return if the budget ends (or the loss breaks) next.
        last_image = param.detach().clamp(0.0, 1.0)  # clamp() makes a new tensor: later steps do not touch it
        if n in snapshots_wanted:
            snapshots[n] = last_image.cpu()
        if on_step is not None:
            on_step(
                Progress(
                    n,
                    budget,
                    state["steps"],
                    values,
                    time.perf_counter() - start,
                    snapshots.get(n),
                )
            )
        return total

    def result(reason: str) -> EngineResult:
        return EngineResult(
            last_image.cpu(),
            trace,
            state["evals"],
            state["steps"],
            reason,
            time.perf_counter() - start,
            optimizer_settings(opt),
            objective.precision,
            snapshots,
            objective.checkpoint,
        )

    reason = "budget"
    try:
        while state["evals"] < budget:
            before = param.detach().clone() if cfg.optimizer == "lbfgs" else None
            try:
                opt.step(closure)  # type: ignore[arg-type]  # torch types closures as -> float
            except _BudgetSpent:
                break
            finally:
                state["steps"] += 1
            # L-BFGS returns without moving when the gradient or the change is below its tolerance; every
            # further step would only re-evaluate the same point.
            if before is not None and torch.equal(before, param.detach()):
                reason = "converged"
                break
    except NonFiniteEvaluation as exc:
        n = state["evals"] + 1
        bad = ", ".join(f"{k}={v:g}" for k, v in exc.losses.items() if not math.isfinite(v))
        raise NonFiniteLossError(
            f"loss became non-finite at iteration {n} ({bad}); kept the image of iteration {n - 1}",
            evaluation=n,
            result=result("nonfinite"),
        ) from None
    except KeyboardInterrupt:
        raise StylizeInterrupted(result("interrupted")) from None
    return result(reason)
