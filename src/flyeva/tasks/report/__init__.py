"""`flyeva report RUN_DIR [RUN_DIR ...]`: plots and a markdown summary of training runs.

    flyeva report runs/miniature_clip                       # -> runs/miniature_clip/report/
    flyeva report runs/a runs/b --out compare/ --recipe clip/miniature

Reads what the engine writes (metrics.jsonl, config.yaml, result.json); import-light: the CLI imports
it on every call.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def report_hint(output_dir: str | Path) -> str:
    """The line every training command prints at its end."""
    return f"see the report: flyeva report {output_dir}"


def _report(args: argparse.Namespace) -> None:
    from flyeva.tasks.report.summary import make_report

    report = make_report(args.run_dirs, args.out, recipe=args.recipe)
    names = ", ".join(p.name for p in report.plots)
    print(f"wrote {report.markdown} and {len(report.plots)} plots ({names})")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva report` to the CLI."""
    report = commands.add_parser("report", help="plots and a markdown summary of one or more training runs")
    report.add_argument("run_dirs", nargs="+", help="training output folders (train.output_dir)")
    report.add_argument("--out", help="where to write report.md and the PNGs (default: FIRST_RUN/report)")
    report.add_argument(
        "--recipe", help="recipe to diff the config against: TASK/NAME (e.g. clip/miniature) or a YAML file"
    )
    report.set_defaults(func=_report)
