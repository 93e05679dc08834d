"""``python -m pipeline sweep``: trainings over params.yaml values, a grid or an Optuna search
(:mod:`pipeline.sweep.runner`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster import config as cluster
from pipeline.core import cli
from pipeline.core.config import from_section, load_params
from pipeline.sweep import runner
from pipeline.sweep.config import SEARCHES, SweepConfig
from pipeline.sweep.space import parse_space
from pipeline.tracking import TrackingConfig


def main(argv: list[str] | None = None) -> int:
    parser = cli.stage_parser("sweep", runner.__doc__)
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="a params.yaml value, or values to sweep, in dvc exp run -S syntax (repeatable; at most 1,000 values "
        "each, and 1,000 trainings a grid)",
    )
    parser.add_argument("--search", default="grid", choices=SEARCHES, help="grid (default) or optuna (TPE)")
    parser.add_argument("--trials", type=int, default=None, help="optuna: the study's total of finished trials")
    parser.add_argument("--name", default=None, help="the sweep's name (default: from the -S values and --search)")
    parser.add_argument(
        "--study-storage",
        default=None,
        metavar="URL",
        help="optuna: the study's database (default: $OPTUNA_STORAGE, else OUT/optuna.db)",
    )
    parser.add_argument("--seed", type=int, default=None, help="optuna: the TPE sampler's seed (one per driver)")
    parser.add_argument(
        "--register",
        action="store_true",
        help="register the best trial's model (by validation accuracy) as a version of tracking.registered_model; "
        "its alias champion moves only to a better validation accuracy",
    )
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="prepared data directory")
    parser.add_argument("--expanded", type=Path, default=Path("data/expanded"), help="expanded data directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: data/sweeps/NAME)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    cluster.add_arguments(parser, max_concurrent=True)

    def run(args):
        params = load_params(args.params)
        name = args.name or runner.default_name(args.overrides, args.search)
        sweep = SweepConfig(
            name=name,
            space=parse_space(args.overrides, params, source=args.params),
            search=args.search,
            trials=args.trials,
            study_storage=args.study_storage,
            seed=args.seed,
            cluster=cluster.from_args(args),
            tracking=from_section(TrackingConfig, params, "tracking", source=args.params),
            register=args.register,
            progress=not args.no_progress,
        )
        out = args.out or Path("data/sweeps") / name
        summary = runner.run_sweep(sweep, prepared_dir=args.prepared, expanded_dir=args.expanded, out_dir=out)
        print(f"sweep {name}: {summary['finished']} trials finished, {summary['failed']} failed; {out / 'sweep.json'}")
        if summary["best"] is not None:
            best = summary["best"]
            point = " ".join(f"{key}={value}" for key, value in best["point"].items())
            tie = f" ({summary['tie']})" if summary["tie"] else ""
            print(f"  best: {point}, validation accuracy {100 * best['validation_accuracy']:.2f}%{tie}")

    return cli.run(run, parser, argv)
