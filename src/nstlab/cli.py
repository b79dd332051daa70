"""Command line: ``nstlab stylize CONTENT STYLE -o OUT``, ``nstlab demo``, ``nstlab layers``.

Option defaults are read from :class:`nstlab.config.StylizeConfig`, never restated here. Exit codes:
0 success, 1 a run that failed (e.g. non-finite loss), 2 bad input or options, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from nstlab.config import (
    CHECKPOINT_MODES,
    INITS,
    LBFGS_IMPLEMENTATIONS,
    LOSS_TERMS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    StylizeConfig,
)
from nstlab.errors import ConfigError, InputError, NonFiniteLossError, NstlabError, StylizeInterrupted
from nstlab.features import EXTRACTORS

DEFAULTS = StylizeConfig()
DATA_DIR = Path(__file__).parent / "data"
DEMO_CONTENT = DATA_DIR / "coffee.jpg"
DEMO_STYLE = DATA_DIR / "great_wave.jpg"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _default(name: str) -> Any:
    value = getattr(DEFAULTS, name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def add_config_options(p: argparse.ArgumentParser) -> None:
    """Every StylizeConfig field as an option; defaults shown are the dataclass's."""
    g = p.add_argument_group("stylisation settings (defaults: the report's best setting)")
    g.add_argument("--extractor", choices=list(EXTRACTORS), help="feature extractor (default: %(default)s)")
    g.add_argument("--content-layers", type=_csv(str), metavar="L1,L2", help="override the content layers")
    g.add_argument("--style-layers", type=_csv(str), metavar="L1,L2", help="override the style layers")
    g.add_argument(
        "--style-layer-weights", type=_csv(float), metavar="W1,W2", help="one weight per style layer"
    )
    g.add_argument(
        "--weights",
        metavar="torchvision|random|FILE",
        help="extractor weights: torchvision's ImageNet weights, a local state dict, or random "
        "(tests and smoke runs only; outputs are marked) (default: %(default)s)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, help="learning rate (default: lbfgs 1, adam 0.1, adamw 0.01)")
    g.add_argument(
        "--iterations",
        type=int,
        metavar="N",
        help="objective evaluations (forward + backward) for every optimiser (default: %(default)s)",
    )
    g.add_argument("--init", choices=INITS, help="initial image (default: %(default)s)")
    g.add_argument(
        "--losses",
        type=_csv(str),
        metavar=",".join(LOSS_TERMS),
        help="loss terms to use (default: %(default)s)",
    )
    g.add_argument("--content-weight", type=float, help="lambda_content (default: %(default)s)")
    g.add_argument("--style-weight", type=float, help="lambda_style (default: %(default)s)")
    g.add_argument("--tv-weight", type=float, help="lambda_tv (default: %(default)s)")
    g.add_argument("--size", type=int, help="long side of the content image in px (default: %(default)s)")
    g.add_argument("--seed", type=int, help="(default: %(default)s)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument(
        "--scales",
        type=_csv(float),
        metavar="F1,F2,1",
        help="coarse-to-fine: fractions of --size, ascending, ending with 1 (default: 1)",
    )
    g.add_argument(
        "--scale-iterations",
        type=_csv(int),
        metavar="N1,N2",
        help="evaluations at each coarse scale (one per scale before the last)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="extractor precision; Grams, losses and the image stay fp32 (default: %(default)s = fp32)",
    )
    g.add_argument(
        "--checkpoint",
        choices=CHECKPOINT_MODES,
        help="activation checkpointing: a fraction of the memory for ~1.5x the time, same result "
        "(default: %(default)s = on above 2048x2048 px)",
    )
    g.add_argument(
        "--lbfgs-history",
        type=int,
        metavar="N",
        help="L-BFGS curvature pairs kept, 2 image-sized vectors each (default: %(default)s)",
    )
    g.add_argument(
        "--lbfgs-impl",
        choices=LBFGS_IMPLEMENTATIONS,
        help="L-BFGS search direction: compact (nstlab's, faster) or torch (torch.optim.LBFGS); "
        "the same iterates up to float rounding (default: %(default)s)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the extractor: slow start, faster evaluations on long runs (default: off)",
    )
    g.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        help="CUDA: deterministic kernels, no cudnn.benchmark (same seed -> same pixels; default: off)",
    )
    p.set_defaults(**{f.name: _default(f.name) for f in dataclasses.fields(StylizeConfig)})


def config_from_args(args: argparse.Namespace) -> StylizeConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StylizeConfig)}
    preset = PRESETS[getattr(args, "preset", None) or "report"]
    for name, value in preset.items():  # a preset fills the options left at their defaults
        if values[name] in (_default(name), getattr(DEFAULTS, name)):  # argparse may have parsed the default
            values[name] = value
    for name, value in values.items():
        default = getattr(DEFAULTS, name)
        if isinstance(default, tuple) and isinstance(value, str):
            values[name] = tuple(value.split(","))
    return StylizeConfig.from_dict(values)


def build_parser() -> argparse.ArgumentParser:
    from nstlab import __version__

    parser = argparse.ArgumentParser(prog="nstlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nstlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    st = sub.add_parser("stylize", help="stylise one content image with one style image")
    st.add_argument("content", help="content image")
    st.add_argument("style", help="style image")
    st.add_argument("-o", "--output", required=True, help="output image (.png lossless; .jpg/.webp/.tif)")
    add_run_options(st)
    add_config_options(st)

    demo = sub.add_parser("demo", help="stylise the bundled example pair (public-domain / CC0 images)")
    demo.add_argument("-o", "--output", default="out/demo.png", help="output image (default: %(default)s)")
    add_run_options(demo)
    add_config_options(demo)
    demo.set_defaults(size=256)  # a quick first look on a CPU; pass --size 512 for the report's scale

    study = sub.add_parser("study", help="ablation studies: run a grid of (pair x setting) jobs, resumably")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    run = study_sub.add_parser("run", help="run the jobs that are not done yet")
    run.add_argument("study_file", help="study TOML file")
    run.add_argument(
        "--smoke",
        action="store_true",
        help="shrink to seconds: 64 px, a few iterations, random weights, own output folder",
    )
    run.add_argument(
        "--executor",
        choices=["local", "pool", "ray"],
        default="local",
        help="local (default; one job at a time, all cores), pool (--workers processes) or ray",
    )
    run.add_argument("--workers", type=int, default=1, help="processes for the pool executor")
    run.add_argument("--address", help="Ray cluster address HOST:PORT (default: start a local Ray)")
    run.add_argument("--device", default="auto", help="device for every job (default: %(default)s)")
    run.add_argument("--cpus-per-job", type=float, default=1.0, help="Ray CPU request per job")
    run.add_argument("--gpus-per-job", type=float, default=0.0, help="Ray GPU request per job")
    run.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="Ray: queue jobs no node can take yet (an autoscaling cluster adds nodes) instead of refusing",
    )
    run.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    run.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="run up to N settings of one pair (optimiser, lr, init, loss terms...) as one batch (same "
        "results up to rounding, N times the "
        "activation memory; meant for GPUs; default: %(default)s)",
    )
    run.add_argument("-q", "--quiet", action="store_true")
    status = study_sub.add_parser("status", help="done / running / failed / pending")
    status.add_argument("study_file")
    status.add_argument("--smoke", action="store_true", help="the --smoke variant's status")
    status.add_argument("--failed", action="store_true", help="list failed jobs and their reasons")

    from nstlab import cli_eval

    cli_eval.add_parsers(sub)
    from nstlab import cli_report

    cli_report.add_parser(sub)

    layers = sub.add_parser("layers", help="list the named layers of an extractor and its report defaults")
    layers.add_argument("extractor", nargs="?", choices=list(EXTRACTORS))
    return parser


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a named setting; explicit options still override it (default: report)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print the expected peak memory and time, then exit without stylising",
    )
    p.add_argument(
        "--save-every", type=int, default=0, metavar="N", help="also save the image every N iterations"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _fail(code: int, message: str) -> NoReturn:
    print(f"nstlab: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _warn(message: str) -> None:
    print(f"nstlab: WARNING: {message}", file=sys.stderr)


class ProgressBar:
    """tqdm on a terminal (current losses in the postfix); silent when not a TTY or with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            unit="it",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=quiet or not sys.stderr.isatty(),
        )
        self.last = 0.0

    def __call__(self, n: int, losses: dict[str, float]) -> None:
        self.bar.update(n - self.bar.n)
        now = time.monotonic()
        if now - self.last > 0.25:  # redrawing the postfix every evaluation would cost more than it shows
            self.last = now
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_stylize(args: argparse.Namespace, content: Path | str, style: Path | str) -> int:
    from nstlab import images
    from nstlab.api import RANDOM_WEIGHTS_WARNING, check_sidecar_free, sidecar_path, stylize, write_record

    cfg = config_from_args(args)
    out = Path(args.output)
    images.check_output_path(out)
    images.check_not_an_input(out, (content, style))
    check_sidecar_free(out)
    if args.save_every < 0:
        raise ConfigError(f"--save-every must be >= 0, got {args.save_every}")
    if args.estimate:
        from nstlab.api import estimate

        print(estimate(content, style, cfg).describe())
        return 0
    if cfg.weights == "random":
        _warn(RANDOM_WEIGHTS_WARNING)
    snapshots = range(args.save_every, cfg.iterations + 1, args.save_every) if args.save_every else range(0)
    steps_dir = out.with_name(out.stem + "_steps")
    if snapshots and steps_dir.is_dir():
        # Step images of an earlier run to the same output would mix with this run's (other steps, other
        # result): they belong to the output this run replaces. Only our own NNNNN.ext names are touched.
        for old in steps_dir.iterdir():
            if old.is_file() and old.stem.isdigit() and len(old.stem) == 5 and old.suffix == out.suffix:
                old.unlink()
    bar = ProgressBar(cfg.iterations, args.quiet)

    def on_step(p: Any) -> None:
        bar(p.evaluation, p.losses)
        if p.image is not None:
            images.save_image(p.image, steps_dir / f"{p.evaluation:05d}{out.suffix}")

    try:
        result = stylize(content, style, cfg, on_step=on_step, snapshot_at=snapshots)
    except NonFiniteLossError as exc:
        bar.close()
        if exc.result is not None and exc.result.engine.evaluations > 0:
            exc.result.save(out)
            write_record(exc.result.record | {"output": str(out), "error": str(exc)}, sidecar_path(out))
            _fail(1, f"{exc}; saved it to {out}")
        _fail(1, str(exc))
    except StylizeInterrupted as exc:
        bar.close()
        if exc.result is not None:
            exc.result.save(out)
            print(
                f"nstlab: interrupted after {exc.result.engine.evaluations} iterations; saved {out} and "
                f"{sidecar_path(out)}",
                file=sys.stderr,
            )
        return 130
    bar.close()
    result.save(out)
    final = result.record["final_losses"] or {}
    if not args.quiet:
        print(
            f"saved {out} ({result.engine.evaluations} iterations, {result.engine.wall_time_s:.1f} s, "
            f"final loss {final.get('total', float('nan')):.4g}); record: {sidecar_path(out)}",
            file=sys.stderr,
        )
    if result.random_weights:
        _warn(f"{out} was made with RANDOM weights: not a real style transfer result")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from nstlab.api import get_extractor, resolve_device
    from nstlab.errors import WeightsError

    cfg = config_from_args(args)
    if cfg.weights == "torchvision":
        try:
            get_extractor(cfg, resolve_device(cfg.device))
        except WeightsError as exc:
            _warn(f"{exc}")
            _warn(
                "FALLING BACK to --weights random so the demo can run: the output shows that the "
                "pipeline works, NOT what style transfer looks like."
            )
            args.weights = "random"
    print(
        f"demo: {DEMO_CONTENT.name} (CC0) x {DEMO_STYLE.name} (public domain) -> {args.output}",
        file=sys.stderr,
    )
    return run_stylize(args, DEMO_CONTENT, DEMO_STYLE)


def run_study_command(args: argparse.Namespace) -> int:
    from nstlab.study import RunOptions, Store, load_study, run_study, store_path

    study = load_study(args.study_file, smoke=args.smoke)
    jobs = study.jobs()
    if args.study_command == "run":
        executor = "pool" if args.executor == "local" and args.workers > 1 else args.executor
        opts = RunOptions(
            executor=executor,
            workers=args.workers,
            address=args.address,
            device=args.device,
            cpus_per_job=args.cpus_per_job,
            gpus_per_job=args.gpus_per_job,
            wait_for_resources=args.wait_for_resources,
            retry_failed=args.retry_failed,
            batch=args.batch,
        )
        if not args.quiet:
            print(
                f"study {study.name}: {len(jobs)} jobs ({len(study.pairs)} pairs x {len(study.settings)} "
                f"settings) in {study.folder}{' [SMOKE: random weights, 64 px]' if study.smoke else ''}",
                file=sys.stderr,
            )
        random = sum(j.config.weights == "random" for j in jobs)
        if random and not study.smoke:  # a smoke study says so above; a real one must not pass unnoticed
            _warn(
                f"{random} of {len(jobs)} jobs use RANDOM weights: their results are not real style transfer"
            )
        try:
            counts = run_study(study, opts, quiet=args.quiet)
        except KeyboardInterrupt:
            print("nstlab: interrupted; run the same command again to continue", file=sys.stderr)
            return 130
        print(_counts_line(counts))
        return 0 if counts["failed"] == 0 else 1
    if not store_path(study).exists():
        print(_counts_line({"done": 0, "running": 0, "failed": 0, "pending": len(jobs)}))
        return 0
    store = Store(store_path(study))
    try:
        print(_counts_line(store.counts([j.id for j in jobs])))
        if args.failed:
            for row in store.rows([j.id for j in jobs]):
                if row["status"] == "failed":
                    print(f"  {row['pair']} · {row['setting']}: {row['error']}")
    finally:
        store.close()
    return 0


def _counts_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return (
        f"{counts['done']}/{total} done, {counts['running']} running, {counts['failed']} failed, "
        f"{counts['pending']} pending"
    )


def run_layers(args: argparse.Namespace) -> int:
    for name, spec in EXTRACTORS.items():
        if args.extractor in (None, name):
            print(f"{name} ({spec.display})")
            print(f"  content (report): {', '.join(spec.content_layers)}")
            print(f"  style (report):   {', '.join(spec.style_layers)}")
            print(f"  all layers:       {', '.join(spec.layer_names())}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "stylize":
        return run_stylize(args, args.content, args.style)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "study":
        return run_study_command(args)
    if args.command == "report":
        from nstlab import cli_report

        return cli_report.run(args)
    if args.command in ("reference", "evaluate"):
        from nstlab import cli_eval

        return cli_eval.run(args)
    return run_layers(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is handled below
        return code
    except InputError as exc:
        _fail(2, str(exc))
    except NstlabError as exc:
        _fail(1, str(exc))
    except KeyboardInterrupt:
        print("nstlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `nstlab study status --failed | head`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit quietly as other filters do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
