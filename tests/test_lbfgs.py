"""nstlab.lbfgs.CompactLBFGS against torch.optim.LBFGS, which it replaces by default.

The two are the same algorithm; only the product H·g is computed another way (compact representation
instead of the two-loop recursion). In float64 on problems where rounding is not amplified, every iterate
must agree to ~1e-12, with the same closure calls, across history wrap-around, step() boundaries, rejected
curvature pairs and the stopping tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config
from torch import Tensor

import nstlab
from nstlab.errors import ConfigError
from nstlab.lbfgs import CHUNK, CompactLBFGS

Objective = Callable[[Tensor], Tensor]


def _convex(n: int = 60, seed: int = 0) -> tuple[Objective, Tensor]:
    """A smooth strictly convex non-quadratic function (condition number ~1e2) and a start point."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-2, 0, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)

    def f(x: Tensor) -> Tensor:  # a quadratic plus a pseudo-Huber term
        return 0.5 * x @ a @ x - b @ x + 0.5 * (torch.sqrt(1 + x**2) - 1).sum()

    return f, torch.randn(n, generator=gen, dtype=torch.float64)


def _iterates(
    cls: type[torch.optim.Optimizer], f: Objective, x0: Tensor, steps: int, **kw: object
) -> tuple[Tensor, list[float], dict[str, object]]:
    """Every point the closure was called at, the losses returned by step(), and the final state."""
    x = x0.clone().requires_grad_(True)
    opt = cls([x], **kw)
    seen: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad()
        loss = f(x)
        loss.backward()  # type: ignore[no-untyped-call]
        seen.append(x.detach().clone())
        return loss

    returned = [float(opt.step(closure).detach()) for _ in range(steps)]  # type: ignore[arg-type]
    return torch.stack(seen), returned, opt.state[x]


@pytest.mark.parametrize("history", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 100])
@pytest.mark.parametrize("max_iter", [20, 7])
def test_same_iterates_as_torch_lbfgs_in_float64(history: int, max_iter: int) -> None:
    # 8 step() calls of up to max_iter iterations: ~140 evaluations, so every history below 100 wraps
    # around (several times for the small ones) and the slots cross block boundaries.
    f, x0 = _convex()
    kw = {"lr": 1.0, "max_iter": max_iter, "history_size": history, "tolerance_change": 0.0}
    ref, ref_losses, ref_state = _iterates(torch.optim.LBFGS, f, x0, 8, **kw)
    got, got_losses, got_state = _iterates(CompactLBFGS, f, x0, 8, **kw)
    assert got.shape == ref.shape and len(ref) > 40
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert got_losses == pytest.approx(ref_losses, rel=1e-12)
    assert got_state["n_iter"] == ref_state["n_iter"] and got_state["func_evals"] == ref_state["func_evals"]
    assert got_state["history"].used() == len(ref_state["old_dirs"])  # type: ignore[attr-defined]
    # Memory: pairs are allocated in blocks of CHUNK slots as they are needed, never beyond the history.
    used = got_state["history"].used()  # type: ignore[attr-defined]
    slots = sum(b.shape[0] for b in got_state["history"].blocks)  # type: ignore[attr-defined]
    assert slots == min(history, -(-used // CHUNK) * CHUNK)


@pytest.mark.parametrize("history", [100, 5])
def test_rejected_curvature_pairs_match_torch(history: int) -> None:
    # A double well started near its top: where the curvature along a step is negative, sᵀy <= 1e-10 and
    # the pair is dropped; both implementations must then go on with the older pairs and the older γ.
    def f(x: Tensor) -> Tensor:
        return ((x**2 - 1) ** 2).sum() + 0.1 * (x[1:] * x[:-1]).sum()

    x0 = torch.linspace(0.05, 0.3, 30, dtype=torch.float64)
    kw = {"lr": 1.0, "max_iter": 20, "history_size": history}
    ref, _, ref_state = _iterates(torch.optim.LBFGS, f, x0, 2, **kw)
    got, _, got_state = _iterates(CompactLBFGS, f, x0, 2, **kw)
    if history == 100:  # some pairs were rejected (fewer kept than candidate pairs)
        assert len(ref_state["old_dirs"]) < ref_state["n_iter"] - 1  # type: ignore[arg-type,operator]
    assert got_state["history"].used() == len(ref_state["old_dirs"])  # type: ignore[attr-defined,arg-type]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_stopping_tests_match_torch() -> None:
    f, x0 = _convex(n=20)
    # A start at the optimum: the gradient test stops before moving (one evaluation, no iteration).
    x_opt = _iterates(torch.optim.LBFGS, f, x0, 10, history_size=50)[0][-1]
    for start, kw in ((x0, {"tolerance_change": 1e-6}), (x0, {"tolerance_grad": 1e-3}), (x_opt, {})):
        ref, ref_losses, ref_state = _iterates(torch.optim.LBFGS, f, start, 5, **kw)
        got, got_losses, got_state = _iterates(CompactLBFGS, f, start, 5, **kw)
        assert got.shape == ref.shape, kw
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        assert got_state["func_evals"] == ref_state["func_evals"]


def test_float32_image_run_matches_torch_lbfgs_up_to_rounding(pair: tuple[Path, Path]) -> None:
    # The real objective in fp32 through the engine: the first evaluations agree to float rounding; over
    # more steps L-BFGS amplifies rounding, so the end is compared by loss (1 %), like other fp32 kernel
    # changes (checkpointing, compile).
    runs = {
        impl: nstlab.stylize(*pair, tiny_config(iterations=30, lbfgs_impl=impl))
        for impl in ("compact", "torch")
    }
    first = [t["total"] for t in runs["torch"].trace[:6]]
    assert [t["total"] for t in runs["compact"].trace[:6]] == pytest.approx(first, rel=1e-4)
    assert runs["compact"].trace[-1]["total"] == pytest.approx(runs["torch"].trace[-1]["total"], rel=1e-2)
    assert runs["compact"].record["optimizer"]["class"] == "CompactLBFGS"
    assert runs["torch"].record["optimizer"]["class"] == "LBFGS"
    assert runs["compact"].record["config"]["lbfgs_impl"] == "compact"


def test_choice_is_validated_and_not_part_of_a_jobs_identity(pair: tuple[Path, Path]) -> None:
    from nstlab.config import StylizeConfig
    from nstlab.study.spec import Pair, identity

    with pytest.raises(ConfigError, match="Did you mean 'compact'"):
        StylizeConfig(lbfgs_impl="compat")
    p = Pair("p", *pair)
    assert identity(StylizeConfig(lbfgs_impl="torch"), p) == identity(StylizeConfig(), p)
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="no line search"):
        CompactLBFGS([x], line_search_fn="strong_wolfe")
    with pytest.raises(ValueError, match="exactly one tensor"):
        CompactLBFGS([x, torch.zeros(2, requires_grad=True)])


def test_cli_runs_either_implementation(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from nstlab.cli import main

    out = tmp_path / "o.png"
    args = [str(pair[0]), str(pair[1]), "-o", str(out), "--size", "32", "--iterations", "3"]
    assert main(["stylize", *args, "--weights", "random", "--lbfgs-impl", "torch"]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit) as exc:
        main(["stylize", *args, "--weights", "random", "--lbfgs-impl", "fast"])
    assert exc.value.code == 2


def test_autocast_regions_and_huge_histories_do_not_change_or_inflate_anything() -> None:
    # Called inside an autocast region (a user's mixed-precision code), the direction's matrix products
    # must not drop to bf16: the iterates equal the plain fp32 run's, as torch's do.
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(500, generator=gen) + 0.1

    def g(x: Tensor) -> Tensor:  # element-wise only: autocast leaves the objective itself in fp32
        return (a * x**2).sum() + (torch.sqrt(1 + x**2) - 1).sum()

    x32 = torch.randn(500, generator=gen)
    kw = {"history_size": 10, "tolerance_change": 0.0}
    plain, _, _ = _iterates(CompactLBFGS, g, x32, 3, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _, _ = _iterates(CompactLBFGS, g, x32, 3, **kw)
    assert len(plain) > 20
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    # The k x k matrices grow with the pairs held, not with history_size (10**6 would be 16 TB up front).
    f, x0 = _convex(n=200)
    _, _, state = _iterates(CompactLBFGS, f, x0, 1, history_size=10**6)
    hist = state["history"]
    assert hist.sy.shape[0] <= hist.used() + CHUNK  # type: ignore[attr-defined]


def test_curvature_diagonal_is_the_accepted_sy() -> None:
    # D = diag(SᵀY) must be the sᵀy values that passed the > 1e-10 test, not re-rounded copies from the
    # matrix product, which in fp32 can fall to <= 0 where sᵀy is mostly rounding noise (H indefinite).
    from nstlab.lbfgs import _History

    gen = torch.Generator().manual_seed(0)
    n, accepted = 2000, 0
    for _ in range(100):
        s = torch.randn(n, generator=gen)
        y = torch.randn(n, generator=gen)
        y -= (y @ s) / (s @ s) * s  # nearly orthogonal: sᵀy is rounding noise, either sign
        ys = y.dot(s)
        if ys > 1e-10:
            accepted += 1
            hist = _History(3, s)
            hist.push(s, y, float(ys), float(y.dot(y)))
            hist.direction(torch.stack([torch.ones(n), y]), out=torch.empty(n))
            assert hist.sy[0, 0] == float(ys)
    assert accepted > 10
