"""L-BFGS whose search direction comes from the compact representation of the inverse Hessian.

The algorithm is torch.optim.LBFGS without line search, step for step: the same step lengths (lr, and
min(1, 1/|g|_1)·lr on the very first iteration), the same curvature-pair rule (a pair (s, y) is kept only
when sᵀy > 1e-10; the oldest is dropped beyond ``history_size``), H0 = γI with γ = sᵀy / yᵀy of the newest
kept pair, the same stopping tests, and the same closure calls. Only the product d = -H g is computed
another way; in exact arithmetic the iterates are identical, in floating point they agree to rounding.

Why: torch's two-loop recursion walks the history pair by pair (a dot product and an axpy per pair and
loop, ~200 small kernels). At the report's history of 100 pairs that was 22-27 % of a ResNet-18 run on
CPU (benchmarks/README.md, "L-BFGS's own time"). Byrd, Nocedal & Schnabel (1994, Thm 2.2) write the same
matrix as

    H = γI + [S  γY] M [Sᵀ; γYᵀ],   M = [[R⁻ᵀ(D + γYᵀY)R⁻¹, -R⁻ᵀ], [-R⁻¹, 0]],

with S, Y the stored pairs (oldest first), R the upper triangle of SᵀY (R_ab = s_aᵀy_b, a <= b) and D its
diagonal. So H g needs the history twice, as two matrix products: one for the inner products [Sᵀg, Yᵀg]
(together with Sᵀy, Yᵀy for the newest y, which keep SᵀY and YᵀY up to date without another pass), one to
combine γg + S a + Y b. The small k×k algebra in between runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# Stored pairs live in blocks of this many slots, allocated as the history fills, so that a short run
# holds little more than the pairs it has (at most CHUNK - 1 unused slots), while each matrix product
# still streams a block of contiguous rows.
CHUNK = 16


class _History:
    """The curvature pairs, in slots reused oldest-first, and their inner products by slot."""

    def __init__(self, size: int, like: Tensor) -> None:
        self.size = size
        self.n = like.numel()
        self.dtype, self.device = like.dtype, like.device
        self.blocks: list[Tensor] = []  # block b: (slots, 2, n); [:, 0] = s, [:, 1] = y
        self.order: list[int] = []  # slots, oldest pair first
        # The k x k algebra runs on the CPU in float64 (MPS has no float64; the copies are 2k numbers). The
        # matrices grow with the allocated slots, not to history_size up front (which may be huge).
        self.sy = torch.zeros(0, 0, dtype=torch.float64)  # s_iᵀ y_j by slot
        self.yy = torch.zeros(0, 0, dtype=torch.float64)  # y_iᵀ y_j by slot
        self.h_diag: float | Tensor = 1.0
        self.new_diag: tuple[float, float] = (0.0, 0.0)  # sᵀy, yᵀy of the pair pushed last

    def used(self) -> int:
        return len(self.order)

    def _rows(self, k: int) -> list[Tensor]:
        """The first k slots as (2·rows, n) matrices, block by block (rows alternate s, y)."""
        out = []
        for b, block in enumerate(self.blocks):
            rows = min(block.shape[0], k - b * CHUNK)
            if rows <= 0:
                break
            out.append(block[:rows].view(2 * rows, self.n))
        return out

    def push(self, s: Tensor, y: Tensor, ys: float, yy: float) -> None:
        """Store the pair (s, y) whose sᵀy = ``ys`` passed the curvature test (and yᵀy = ``yy``)."""
        slot = len(self.order) if len(self.order) < self.size else self.order.pop(0)
        self.order.append(slot)
        b, r = divmod(slot, CHUNK)
        if b == len(self.blocks):
            slots = min(CHUNK, self.size - b * CHUNK)
            self.blocks.append(torch.empty((slots, 2, self.n), dtype=self.dtype, device=self.device))
            cap = b * CHUNK + slots
            for name in ("sy", "yy"):
                grown = torch.zeros(cap, cap, dtype=torch.float64)
                old = getattr(self, name)
                grown[: old.shape[0], : old.shape[1]] = old
                setattr(self, name, grown)
        self.blocks[b][r, 0].copy_(s)
        self.blocks[b][r, 1].copy_(y)
        self.new_diag = (ys, yy)

    def direction(self, gy: Tensor, out: Tensor) -> Tensor:
        """out = -H g for ``gy`` = (g, y_new) as a (2, n) matrix, y_new being the pair just pushed (its
        inner products with every stored pair come from the same pass as g's), or (g,) as (1, n) when no
        pair was added since the last call."""
        k = self.used()
        g = gy[0]
        # Pass 1 over the history: rows (g[, y]) times every stored s and y, in slot order. Never under an
        # autocast region the caller may have open: these products must stay in the parameter's precision.
        with torch.autocast(device_type=g.device.type, enabled=False):
            products = torch.cat([torch.mm(gy, rows.t()) for rows in self._rows(k)], dim=1).cpu().double()
        sg, yg = products[0, 0::2], products[0, 1::2]
        if gy.shape[0] == 2:
            new = self.order[-1]
            self.sy[:k, new] = products[1, 0::2]  # s_iᵀ y_new: the new column of R
            self.yy[:k, new] = products[1, 1::2]
            self.yy[new, :k] = products[1, 1::2]
            # D must hold the sᵀy that passed the curvature test (> 1e-10), not a re-rounded copy that could
            # fall to <= 0 when sᵀy is mostly rounding noise and make H indefinite.
            self.sy[new, new], self.yy[new, new] = self.new_diag
        idx = torch.tensor(self.order)
        gamma = float(self.h_diag)
        sy = self.sy[idx.unsqueeze(1), idx]
        r = torch.triu(sy)
        yy = self.yy[idx.unsqueeze(1), idx]
        p, q = sg[idx].unsqueeze(1), yg[idx].unsqueeze(1)
        # H g = γ g + S a + Y b with u = R⁻¹ Sᵀg, a = R⁻ᵀ((D + γ YᵀY) u - γ Yᵀg), b = -γ u.
        u = torch.linalg.solve_triangular(r, p, upper=True)
        rhs_a = torch.diagonal(sy).unsqueeze(1) * u + gamma * (yy @ u) - gamma * q
        a = torch.linalg.solve_triangular(r.t(), rhs_a, upper=False)
        coef = torch.zeros(k, 2, dtype=torch.float64)
        coef[idx, 0] = a.squeeze(1)
        coef[idx, 1] = -gamma * u.squeeze(1)
        coef_rows = coef.reshape(-1).to(g.dtype).to(g.device)  # cast on the CPU: MPS has no float64
        # Pass 2: out = -(γ g + Σ coefficients · rows).
        torch.mul(g, gamma, out=out)
        start = 0
        with torch.autocast(device_type=g.device.type, enabled=False):
            for rows in self._rows(k):
                out.addmv_(rows.t(), coef_rows[start : start + rows.shape[0]])
                start += rows.shape[0]
        return out.neg_()


class CompactLBFGS(torch.optim.Optimizer):
    """Drop-in for ``torch.optim.LBFGS(params, lr, max_iter, max_eval, tolerance_grad, tolerance_change,
    history_size, line_search_fn=None)`` on exactly one tensor (nstlab's image). See the module docstring."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if line_search_fn is not None:
            raise ValueError("CompactLBFGS has no line search; use torch.optim.LBFGS for line_search_fn")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        defaults: dict[str, Any] = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_iter * 5 // 4 if max_eval is None else max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": None,
        }
        super().__init__(params, defaults)
        group = self.param_groups[0]["params"]
        if len(self.param_groups) != 1 or len(group) != 1:
            raise ValueError("CompactLBFGS optimises exactly one tensor")
        self._param: Tensor = group[0]

    def _flat_grad(self, out: Tensor) -> Tensor:
        grad = self._param.grad
        if grad is None:
            return out.zero_()
        return out.copy_(grad.reshape(-1))  # a copy: the caller's closure may reuse .grad in place

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr = float(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        param = self._param
        state = self.state[param]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        # Rows s, g, y: the candidate pair and the current gradient, so that (g, y) is one (2, n) matrix.
        work: Tensor = state.get("work")
        if work is None:
            work = state["work"] = torch.empty((3, param.numel()), dtype=param.dtype, device=param.device)
        s, g, y = work[0], work[1], work[2]

        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        self._flat_grad(g)
        if g.abs().max() <= tolerance_grad:
            return orig_loss
        d: Tensor | None = state.get("d")
        t: float | Tensor = state.get("t", lr)
        prev_g: Tensor | None = state.get("prev_flat_grad")
        prev_loss: float | None = state.get("prev_loss")
        history: _History | None = state.get("history")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1 or d is None or prev_g is None or history is None:
                d = g.neg()
                history = _History(group["history_size"], g)
            else:
                torch.sub(g, prev_g, out=y)
                torch.mul(d, t, out=s)
                ys = y.dot(s)
                added = bool(ys > 1e-10)
                if added:
                    yy = y.dot(y)
                    history.push(s, y, float(ys), float(yy))
                    history.h_diag = ys / yy
                if history.used():
                    d = history.direction(work[1:3] if added else work[1:2], out=d)
                else:  # no pair kept yet: H = 1·I, as torch's empty two-loop recursion gives
                    torch.neg(g, out=d)
            if prev_g is None:
                prev_g = g.clone()
            else:
                prev_g.copy_(g)
            prev_loss = loss

            # The same step length as torch: min(1, 1/|g|_1)·lr on the very first iteration, then lr.
            if state["n_iter"] == 1:
                inv = 1.0 / g.abs().sum()
                t = (inv if inv < 1.0 else 1.0) * lr  # torch's min(1., 1./|g|_1), a tensor when below 1
            else:
                t = lr
            gtd = g.dot(d)
            if gtd > -tolerance_change:
                break
            param.add_(d.view_as(param), alpha=t)  # type: ignore[arg-type]  # a tensor t, as in torch
            evals = 0
            opt_cond = False
            if n_iter != max_iter:  # as torch: no evaluation after the last iteration of a step
                loss = float(closure())
                self._flat_grad(g)
                opt_cond = bool(g.abs().max() <= tolerance_grad)
                evals = 1
            current_evals += evals
            state["func_evals"] += evals
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state.update(d=d, t=t, prev_flat_grad=prev_g, prev_loss=prev_loss, history=history)
        return orig_loss
