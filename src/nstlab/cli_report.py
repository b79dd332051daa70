"""``nstlab report STUDY.toml``: tables, figures and an HTML page from a study's results.

Hooked into :mod:`nstlab.cli` with :func:`add_parser` (adds the ``report`` subcommand) and :func:`run`.
Exit codes: 0 report written (also for a partial study or one with nothing done yet), 2 bad input (missing
study file, unknown format or metric, MLflow not installed), 1 other failures (e.g. MLflow logging).
"""

from __future__ import annotations

import argparse
import sys

from nstlab.errors import InputError, NstlabError

FORMAT_CHOICES = ("md", "latex", "csv", "html")


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` to the ``nstlab`` subcommands."""
    p = sub.add_parser(
        "report",
        help="tables (md, csv, LaTeX), figures and an HTML page from a study's results",
        description="Write <study folder>/report/: tables in the report's shape (one row per metric, one "
        "column per setting, best value marked), per-pair and cost tables, an image grid, loss curves, and a "
        "self-contained index.html. Partial studies are fine: missing cells are marked.",
    )
    p.add_argument("study_file", help="study TOML file")
    p.add_argument("--smoke", action="store_true", help="report on the --smoke variant of the study")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        type=_list,
        metavar="md,latex,csv,html",
        help="formats to write (comma-separated or repeated; default: all). Figures are always written.",
    )
    p.add_argument(
        "--metrics",
        type=_list,
        metavar="rmse,psnr,ssim",
        help="metric rows, in order (default: the study's [metrics].names); also mse, content, style, lpips",
    )
    p.add_argument("--std", action="store_true", help="show ± the standard deviation over pairs")
    p.add_argument("--no-figures", action="store_true", help="tables only (figures take a few seconds)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: <study folder>/report)")
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="also log one MLflow run per job to this tracking URI (needs pip install 'nstlab[mlflow]')",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    """Run ``nstlab report``; prints a one-line error and returns 2 (bad input) or 1 on failure."""
    try:
        return _run(args)
    except InputError as exc:
        print(f"nstlab: error: {exc}", file=sys.stderr)
        return 2
    except NstlabError as exc:
        print(f"nstlab: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a read-only results folder: say where, without a traceback
        print(f"nstlab: error: report failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from nstlab.errors import ConfigError
    from nstlab.report import FORMATS, collect, log_to_mlflow, parse_formats, write_report
    from nstlab.report.mlflow_log import INSTALL_HINT
    from nstlab.study import load_study

    formats = parse_formats([f for group in args.formats for f in group] if args.formats else FORMATS)
    if args.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None
    study = load_study(args.study_file, smoke=args.smoke)
    data = collect(study, args.metrics, args.std)
    out = write_report(data, args.out, formats, figures=not args.no_figures)
    logged = log_to_mlflow(data, args.mlflow) if args.mlflow else None
    if not args.quiet:
        c = data.counts
        main = out / "index.html" if "html" in formats else out
        print(
            f"report: {main} ({c['done']}/{len(data.jobs)} jobs done, {c['failed']} failed, "
            f"{c['pending'] + c['running']} pending)"
            + (f"; {logged} MLflow runs logged to {args.mlflow}" if logged is not None else "")
            + (" [RANDOM WEIGHTS: not real results]" if data.random_weights else "")
        )
    return 0
