"""Seconds, memory and FLOPs per objective evaluation: nstlab's engine against a tutorial-style baseline.

One evaluation = one forward + backward of the whole objective (what one L-BFGS iteration costs). For each
extractor and image size both implementations are built in the same process, on the same image pair, with
the same layers and the very same (random) weights, and timed ALTERNATELY (baseline, nstlab, baseline, ...
after a warm-up), so that load from other processes hits both alike; the ratio column is the median of the
per-round ratios.

    .venv/bin/python benchmarks/bench_eval.py --quick                  # 256 px, 3 repeats, < 2 minutes
    .venv/bin/python benchmarks/bench_eval.py --sizes 256,512 --json out/bench_eval.json
    .venv/bin/python benchmarks/bench_eval.py --extractors resnet18 --sizes 1024 --variants all

What is timed:
* ``nstlab``: exactly the body of ``engine.optimize``'s closure -- ``opt.zero_grad(set_to_none=True)``,
  ``engine.evaluate_objective`` (``objective.terms(param)``, stack + sum, one host sync (``tolist``),
  ``total.backward()``) and the copy of the current image -- at the content image;
* ``engine``: ``optimize(..., iterations=N)`` itself; per evaluation = ``EngineResult.wall_time_s / N``
  (the engine starts its clock after building the objective, so setup is excluded and reported apart);
* ``baseline``: ``BaselineNST.evaluate`` (clamp in place, forward through the loss-module chain, backward
  -- weights not frozen); ``baseline run``: ``BaselineNST.run(N)`` per evaluation, alternating with
  ``engine``.
Optional variants (``--variants``): ``baseline_frozen`` (the baseline with ``requires_grad_(False)``) and
``nstlab_cl`` (nstlab's objective with the extractor and its input in channels_last memory format) and
``nstlab_plain`` (nstlab without its hand-written backward passes, for its own evaluations only:
autograd's Gram backward and the first convolution's own input gradient -- see ``plain_paths``) and
``nstlab_onednn_grad`` (only the first convolution's input gradient back to oneDNN's: ResNet's stem, VGG's
conv1_1).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one evaluation (forward + backward; it counts
convolutions and matrix products, not element-wise work). Achieved fraction = FLOPs / (seconds per
evaluation) / (fp32 ``torch.mm`` GFLOP/s measured on 2048 x 2048 matrices right before and after that
configuration). Peak memory: the RSS high-water mark (VmHWM) of a fresh subprocess per configuration and
method, from "ready to evaluate" through a warm-up and one more evaluation; "+MiB" is the growth over the RSS
just before (network, targets and the Python/torch runtime are in the absolute number).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import _common as C
import torch
from baseline import BaselineNST
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nstlab import losses
from nstlab.config import StylizeConfig
from nstlab.engine import Objective, evaluate_objective, initial_image, optimize
from nstlab.features import FeatureExtractor, build_extractor, get_spec
from nstlab.features.subpixel import SubPixelGradConv2d
from nstlab.optim import make_optimizer

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")

EXTRACTORS = ("vgg16", "vgg19", "resnet18")
VARIANTS = ("baseline", "nstlab", "baseline_frozen", "nstlab_cl", "nstlab_plain", "nstlab_onednn_grad")
# Variants of older result files, still rendered by --render.
OLD_VARIANTS = ("nstlab_fastgram", "nstlab_cl_fastgram")


class ChannelsLast(nn.Module):
    """An nstlab extractor run in channels_last memory format (a copy; the original is untouched)."""

    def __init__(self, inner: FeatureExtractor) -> None:
        super().__init__()
        # .eval() again: deepcopy of the extractor's fx GraphModule puts its submodules (BatchNorm!) back
        # into training mode (torch 2.14), which silently changes ResNet's features.
        self.inner = copy.deepcopy(inner).to(memory_format=torch.channels_last).eval()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = self.inner(x.contiguous(memory_format=torch.channels_last))
        return out


@contextlib.contextmanager
def plain_paths(extractor: nn.Module | None, *, gram: bool = True) -> Iterator[None]:
    """nstlab as it was before its hand-written backward passes (``nstlab_plain``): autograd's own Gram
    backward (``losses.gram_matrix_reference``, swapped in; the engine looks ``gram_matrix`` up at call
    time) and the first convolution's own input gradient (``subpixel_grad = False``: ResNet's stem, VGG's
    conv1_1). ``gram=False`` (``nstlab_onednn_grad``) keeps nstlab's Gram: only the convolution changes."""
    if extractor is None:
        yield
        return
    stems = {m: m.subpixel_grad for m in extractor.modules() if isinstance(m, SubPixelGradConv2d)}
    original = losses.gram_matrix
    if gram:
        losses.gram_matrix = losses.gram_matrix_reference
    for m in stems:
        m.subpixel_grad = False
    try:
        yield
    finally:
        losses.gram_matrix = original
        for m, before in stems.items():
            m.subpixel_grad = before


class NstlabEval:
    """One evaluation exactly as ``engine.optimize``'s closure performs it (without the trace bookkeeping
    that only appends to a list), at a fixed parameter (the initial image)."""

    def __init__(
        self,
        extractor: nn.Module,
        content: Tensor,
        style: Tensor,
        cfg: StylizeConfig,
        plain: bool = False,
        gram: bool = True,
    ) -> None:
        cfg = cfg.resolved()
        assert cfg.lr is not None
        self.plain = extractor if plain else None
        self.gram = gram  # with plain: also autograd's Gram backward
        with plain_paths(self.plain, gram=gram):
            self.objective = Objective(cast(FeatureExtractor, extractor), content, style, cfg)
        self.param = initial_image(cfg, content, style).contiguous().requires_grad_(True)
        self.opt = make_optimizer(cfg.optimizer, self.param, cfg.lr)
        self.last_image = self.param.detach().clone()

    def __call__(self) -> float:
        with plain_paths(self.plain, gram=self.gram):
            return self._evaluate()

    def _evaluate(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        values, _ = evaluate_objective(self.objective, self.param)
        self.last_image = self.param.detach().clamp(0.0, 1.0).cpu().clone()
        return values["total"]


def make_cfg(extractor: str, size: int) -> StylizeConfig:
    # nstlab's default setting (L-BFGS, content init, content + style + TV) with random weights.
    return StylizeConfig(extractor=extractor, weights="random", size=size, device="cpu")


def build(
    variant: str, name: str, content: Tensor, style: Tensor, extractor: FeatureExtractor
) -> BaselineNST | NstlabEval:
    cfg = make_cfg(name, max(content.shape[-2:]))
    if variant in ("baseline", "baseline_frozen"):
        freeze = variant == "baseline_frozen"
        return BaselineNST(name, content, style, cfg.tv_weight, source=extractor, freeze=freeze)
    if variant == "nstlab":
        return NstlabEval(extractor, content, style, cfg)
    if variant == "nstlab_cl":
        return NstlabEval(ChannelsLast(extractor), content, style, cfg)
    if variant == "nstlab_plain":
        return NstlabEval(extractor, content, style, cfg, plain=True)
    if variant == "nstlab_onednn_grad":
        return NstlabEval(extractor, content, style, cfg, plain=True, gram=False)
    raise ValueError(variant)


def evaluator(obj: BaselineNST | NstlabEval) -> Callable[[], float]:
    return obj.evaluate if isinstance(obj, BaselineNST) else obj


def new_extractor(name: str) -> FeatureExtractor:
    cfg = make_cfg(name, 256).resolved()
    assert cfg.content_layers is not None and cfg.style_layers is not None
    return build_extractor(
        get_spec(name), tuple(dict.fromkeys(cfg.content_layers + cfg.style_layers)), "random"
    )


# --- memory probe (runs in a fresh subprocess) --------------------------------------------------------------


def probe_memory(variant: str, name: str, size: int, data: Path, pair: str) -> dict[str, float]:
    content, style = C.load_pair(data, pair, size)
    extractor = new_extractor(name)
    fn = evaluator(build(variant, name, content, style, extractor))
    if variant.startswith("baseline"):
        del extractor  # the baseline holds its own copy of the weights
    C.trim_heap()
    before = C.rss_bytes()
    if not C.reset_peak_rss():
        return {"error": 1.0}
    for _ in range(2):  # warm-up + 1 evaluation (the steady state: later ones peak no higher)
        fn()
    return {"peak_rss_mib": C.mib(C.peak_rss_bytes()), "growth_mib": C.mib(C.peak_rss_bytes() - before)}


def memory_in_subprocess(variant: str, name: str, size: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--probe-memory",
        variant,
        "--extractors",
        name,
        "--sizes",
        str(size),
        "--data",
        str(args.data),
        "--pair",
        args.pair,
        "--threads",
        str(torch.get_num_threads()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return cast(dict[str, float], json.loads(line[6:]))
    print(f"  memory probe {variant} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return {}


# --- one configuration ---------------------------------------------------------------------------------


def flops_of(fn: Callable[[], float]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def bench_config(name: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    content, style = C.load_pair(args.data, args.pair, size)
    extractor = new_extractor(name)
    variants = args.variants
    objs = {v: build(v, name, content, style, extractor) for v in variants}
    fns = {v: evaluator(o) for v, o in objs.items()}
    repeats = args.repeats or (5 if size <= 512 else 3)
    engine_iters = args.engine_iters if args.engine_iters is not None else {256: 10, 512: 5}.get(size, 3)

    mm_before = C.matmul_gflops()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up: oneDNN primitive creation, allocator growth
        for _ in range(args.warmup):
            fns[v]()
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate, and alternate who goes first
        for v in order:
            times[v].append(C.timed(fns[v]))

    engine: list[float] = []
    engine_setup: list[float] = []
    base_run: list[float] = []
    if engine_iters > 0:
        cfg = make_cfg(name, size).replace(iterations=engine_iters)
        baseline = objs.get("baseline")
        for r in range(args.engine_rounds):
            steps: list[str] = ["baseline", "engine"] if r % 2 == 0 else ["engine", "baseline"]
            for step in steps:
                if step == "baseline" and isinstance(baseline, BaselineNST):
                    baseline.run(engine_iters)
                    base_run.append(baseline.last_run_seconds / engine_iters)
                elif step == "engine":
                    t0 = time.perf_counter()
                    res = optimize(extractor, content, style, cfg)
                    total = time.perf_counter() - t0
                    engine.append(res.wall_time_s / res.evaluations)
                    engine_setup.append(total - res.wall_time_s)
    mm_after = C.matmul_gflops()
    peak = C.median(mm_before + mm_after)  # for this configuration; the tables use the run's p90

    flops = {v: flops_of(fns[v]) for v in variants}
    row: dict[str, Any] = {
        "extractor": name,
        "size": size,
        "image_hw": list(content.shape[-2:]),
        "nstlab_precision": getattr(getattr(objs.get("nstlab"), "objective", None), "precision", "fp32"),
        "style_hw": list(style.shape[-2:]),
        "repeats": repeats,
        "mm_gflops": peak,
        "mm_gflops_samples": mm_before + mm_after,
        "engine_iterations": engine_iters,
        "engine_s_per_eval": C.median(engine),
        "engine_setup_s": C.median(engine_setup),
        "engine_samples": engine,
        "baseline_run_s_per_eval": C.median(base_run),
        "baseline_run_samples": base_run,
    }
    for v in variants:
        med = C.median(times[v])
        row[v] = {
            "s_per_eval": med,
            "samples": times[v],
            "flops": flops[v],
            "achieved_fraction": flops[v] / med / (peak * 1e9),
        }
        if v != "baseline" and "baseline" in variants:
            row[v]["ratio_to_baseline"] = C.median(
                [a / b for a, b in zip(times[v], times["baseline"], strict=True)]
            )
    if engine and base_run:
        row["engine_ratio_to_baseline_run"] = C.median(
            [a / b for a, b in zip(engine, base_run, strict=False)]
        )
    if not args.no_memory:
        for v in variants:
            row[v]["memory"] = memory_in_subprocess(v, name, size, args)
    return row


# --- output ----------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _paired(row: dict[str, Any], a: str, b: str) -> float:
    """Median over rounds of (a's time / b's time), the two timed in the same round."""
    if a not in row or b not in row:
        return float("nan")
    xs, ys = row[a]["samples"], row[b]["samples"]
    return C.median([x / y for x, y in zip(xs, ys, strict=True)])


def run_peak_gflops(rows: list[dict[str, Any]]) -> float:
    """The machine's fp32 matmul throughput for this run: the 90th percentile of every ``torch.mm`` sample
    (medians per configuration drop when other processes take the CPU; the p90 is what we got when not)."""
    samples = sorted(x for r in rows for x in r.get("mm_gflops_samples", [r["mm_gflops"]]))
    return float(samples[min(len(samples) - 1, int(0.9 * len(samples)))])


def tables(rows: list[dict[str, Any]], variants: list[str]) -> str:
    peak = run_peak_gflops(rows)
    hw = {id(r): "×".join(map(str, r["image_hw"])) for r in rows}
    out = ["Speed (median seconds per evaluation; ratios = median of the per-round paired ratios)\n"]
    out.append(
        "| extractor | image H×W | baseline s/eval | nstlab s/eval | nstlab/baseline | baseline run s/eval "
        "| engine (optimize) s/eval | engine/baseline run | engine setup s | repeats |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, n = r.get("baseline", {}), r.get("nstlab", {})
        out.append(
            f"| {r['extractor']} | {hw[id(r)]} | {_f(b.get('s_per_eval'))} | {_f(n.get('s_per_eval'))} "
            f"| {_f(_paired(r, 'nstlab', 'baseline'), 2)} | {_f(r['baseline_run_s_per_eval'])} "
            f"| {_f(r['engine_s_per_eval'])} | {_f(r.get('engine_ratio_to_baseline_run'), 2)} "
            f"| {_f(r['engine_setup_s'], 2)} | {r['repeats']} eval, {len(r['engine_samples'])}×"
            f"{r['engine_iterations']} run |"
        )
    out.append(
        f"\nWork and memory (GFLOP per evaluation, forward + backward, as FlopCounterMode counts it; "
        f"achieved = GFLOP/s ÷ {peak:.0f} GFLOP/s, the run's p90 fp32 torch.mm throughput)\n"
    )
    head, sep = "| extractor | image H×W |", "|---|---|"
    for v in variants:
        head += f" {v} GFLOP/eval | {v} achieved | {v} peak RSS MiB (+growth) |"
        sep += "---|---|---|"
    out += [head, sep]
    for r in rows:
        line = f"| {r['extractor']} | {hw[id(r)]} |"
        for v in variants:
            d = r[v]
            mem = d.get("memory") or {}
            m = f"{mem['peak_rss_mib']:.0f} (+{mem['growth_mib']:.0f})" if "peak_rss_mib" in mem else "–"
            achieved = d["flops"] / d["s_per_eval"] / (peak * 1e9)
            line += f" {d['flops'] / 1e9:.1f} | {100 * achieved:.0f}% | {m} |"
        out.append(line)
    extra = [v for v in variants if v not in ("baseline", "nstlab")]
    if extra:
        out.append("\nVariants (median s/eval; paired ratios to the baseline and to nstlab)\n")
        out.append(
            "| extractor | image H×W | "
            + " | ".join(f"{v} s/eval | {v}/baseline | {v}/nstlab" for v in extra)
            + " |"
        )
        out.append("|---|---|" + "---|---|---|" * len(extra))
        for r in rows:
            cells = " | ".join(
                f"{_f(r[v]['s_per_eval'])} | {_f(_paired(r, v, 'baseline'), 2)} "
                f"| {_f(_paired(r, v, 'nstlab'), 2)}"
                for v in extra
            )
            out.append(f"| {r['extractor']} | {hw[id(r)]} | {cells} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractors", default=",".join(EXTRACTORS))
    p.add_argument("--sizes", default="256,512,1024", help="long side in px, comma-separated")
    p.add_argument(
        "--repeats", type=int, default=0, help="timed evaluations per variant (0: 5, or 3 at >512 px)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--engine-iters", type=int, default=None, help="evaluations per optimize() run (0: skip)")
    p.add_argument("--engine-rounds", type=int, default=2, help="alternating baseline.run/optimize pairs")
    p.add_argument("--variants", default="baseline,nstlab", help=f"any of {','.join(VARIANTS)}, or 'all'")
    p.add_argument("--quick", action="store_true", help="256 px, 3 repeats, 3-evaluation runs, 1 round")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    C.add_common_args(p)
    p.add_argument("--render", default=None, help="only print the tables of a JSON file written by --json")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        rows = saved["rows"]
        print(f"# {C.describe_machine(saved['machine'])}")
        print(tables(rows, [v for v in VARIANTS + OLD_VARIANTS if v in rows[0]]))
        return 0
    args.data = C.shared_data(args.data)
    extractors = [e for e in args.extractors.split(",") if e]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(
            "PROBE "
            + json.dumps(probe_memory(args.probe_memory, extractors[0], sizes[0], args.data, args.pair))
        )
        return 0
    if args.quick:
        sizes, args.repeats = [256], args.repeats or 3
        args.engine_iters = 2 if args.engine_iters is None else args.engine_iters
        args.engine_rounds = 1

    info = C.start("bench_eval", 0)  # threads were set above, before the memory probe
    print(f"# pair {args.pair}, sizes {sizes}, variants {args.variants}", flush=True)
    started = time.perf_counter()
    rows = []
    for name in extractors:
        for size in sizes:
            t0 = time.perf_counter()
            row = bench_config(name, size, args)
            rows.append(row)
            brief = ", ".join(f"{v} {row[v]['s_per_eval']:.3f}s" for v in args.variants)
            print(f"# {name} {size}px: {brief} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print(tables(rows, args.variants))
    print(
        f"\n# total {time.perf_counter() - started:.0f} s; "
        f"load average now {' '.join(f'{x:.1f}' for x in C.machine_info()['loadavg_at_start'])}"
    )
    C.write_json(args.json, {"machine": info, "pair": args.pair, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
