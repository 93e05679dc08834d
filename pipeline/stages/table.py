"""``python -m pipeline table``: the book's chapter 6 results table, resumable (:mod:`pipeline.table.runner`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster import config as cluster
from pipeline.core import cli
from pipeline.core.config import from_section, load_params
from pipeline.nn.config import TrainConfig
from pipeline.table import runner
from pipeline.table.report import pct
from pipeline.table.rows import BY_KEY, GROUPS, QUICK
from pipeline.tracking import TrackingConfig
from pipeline.tracking.registry import Registered


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("table", runner.__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['epochs']} epoch on the first {QUICK['train_images']:,} images: a smoke test",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="seeds per row (default 3, as the book; row 8: at least 5)"
    )
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated rows: {', '.join(BY_KEY)}; or groups: "
        + "; ".join(f"{k} ({', '.join(v)})" for k, v in GROUPS.items() if k != "all")
        + "; all is every row (default: the book's rows 1-9)",
    )
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="prepared data directory")
    parser.add_argument("--expanded", type=Path, default=Path("data/expanded"), help="expanded data directory")
    parser.add_argument("--out", type=Path, default=Path("data/table"), help="output directory (report.md, rows)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the networks already on disk (rows or seeds "
        "not yet trained show as not run)",
    )
    parser.add_argument(
        "--register",
        action="store_true",
        help="register the best single network (by validation accuracy) as a version of "
        "tracking.registered_model; its alias champion moves only to a better validation accuracy",
    )
    cluster.add_arguments(parser, max_concurrent=True)

    def run(args):
        params = load_params(args.params)
        train_settings = from_section(TrainConfig, params, "train", source=args.params)
        tracking_config = from_section(TrackingConfig, params, "tracking", source=args.params)
        results = runner.run_table(
            rows=args.rows,
            repeats=args.repeats,
            quick=args.quick,
            prepared_dir=args.prepared,
            expanded_dir=args.expanded,
            out_dir=args.out,
            engine=train_settings.engine,
            device=train_settings.device,
            steps_per_call=train_settings.steps_per_call,
            tracking_config=tracking_config,
            progress=not args.no_progress,
            cluster=cluster.from_args(args),
            report_only=args.report_only,
            register=args.register,
        )
        print(f"trained {len(results['trained'])} networks; report: {args.out / 'report.md'}")
        if results["missing"]:
            print(f"  not trained (--report-only): {missing_text(results['missing'])}")
        for line in results["lines"]:
            if line["ours"] is not None:
                print(f"  row {line['row']:>9}: ours {pct(line['ours'])}, book {pct(line['book'])}")
        if args.register:
            print(registered_text(results["registered"]))

    return cli.run(run, parser, argv)


def registered_text(registered: Registered | None) -> str:
    if registered is None:
        return "registered nothing: no network with an MLflow run and a model (see the warning above)"
    text = f"registered {registered.name} version {registered.version} (champion: version {registered.champion})"
    return text + (f"; {registered.tie}" if registered.tie else "")


def missing_text(missing: list[tuple[str, int]]) -> str:
    """ "8 (seed 2), best (seeds 1, 2, 3, 4, 5)" from [("8", 2), ("best", 1), ...]."""
    by_row: dict[str, list[int]] = {}
    for row, seed in missing:
        by_row.setdefault(row, []).append(seed)
    return ", ".join(
        f"{row} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" for row, seeds in by_row.items()
    )
