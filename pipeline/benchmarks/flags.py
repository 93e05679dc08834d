"""Benchmark an XLA compile option against the backend's own settings, side by side in one process.

For each table row given (its network, batch 10 and its lmbda, dropout as in the table), two trainers
are compiled from the same initial weights: one with the backend's XLA settings, one with ``--option
NAME=VALUE`` on top (``jax.jit``'s ``compiler_options``, which override $XLA_FLAGS). Each trains
``--steps`` mini-batches of synthetic images a call, the two in turn, ``--rounds`` times; it prints
their median images per second, the ratio, and whether their weights are the same bit for bit after
the same steps (an option that changes the arithmetic changes them).

    python -m pipeline.benchmarks.flags     # what the backend's copy insertion setting buys: the option off
    python -m pipeline.benchmarks.flags --option xla_cpu_enable_fast_min_max=true --rows 4
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Iterator

import numpy as np

from pipeline.benchmarks.train import BATCHES_PER_EPOCH, ETA, random_batches
from pipeline.core.config import PipelineError
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import COPY_ANALYSIS_FLAG, Backend
from pipeline.nn.compiled import Trainer
from pipeline.nn.layers import keep_mask
from pipeline.table.rows import BY_KEY, ROWS

BATCH = 10  # the table's
DEFAULT_OPTION = f"{COPY_ANALYSIS_FLAG.removeprefix('--')}=false"


def parse_option(text: str) -> tuple[str, bool | int | float | str]:
    """``NAME=VALUE`` -> (name, value), the value a bool, int or float where it reads as one."""
    name, sep, value = text.removeprefix("--").partition("=")
    if not sep or not name.startswith("xla_") or not value:
        raise PipelineError(
            f"Got --option {text!r}: expected NAME=VALUE with an XLA option name, e.g. {DEFAULT_OPTION}"
        )
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return name, kind(value)
    return name, value


@contextlib.contextmanager
def compiled_with(options: dict | None) -> Iterator[None]:
    """Every ``jax.jit`` made inside (PyTensor's JAX linkers make theirs when a function is compiled)
    takes ``options`` as its compiler options."""
    import jax

    plain = jax.jit
    if options:
        jax.jit = functools.partial(plain, compiler_options=options)
    try:
        yield
    finally:
        jax.jit = plain


class Contestant:
    """One row's network and trainer, compiled with ``options``, and the mini-batches it trains on."""

    def __init__(self, row_key: str, steps: int, options: dict | None):
        row = BY_KEY[row_key]
        settings = row.settings or {}
        self.network = build(resolve(row.preset), rng=np.random.default_rng(0))
        self.trainer = Trainer(
            self.network,
            Backend("jax", "cpu"),
            batch_size=BATCH,
            lmbda=settings.get("lmbda", 0.0),
            momentum=settings.get("momentum", 0.0),
            num_training_batches=BATCHES_PER_EPOCH,
        )
        self.eta = settings.get("eta", ETA)
        self.images, self.labels = random_batches(steps, BATCH)
        rng = np.random.default_rng(1)
        layers = [self.network.layers[i] for i in self.network.dropout_layers]
        self.keeps = [keep_mask(rng, (steps, BATCH, layer.n_in), layer.p_dropout) for layer in layers]
        with compiled_with(options):
            self.call()  # compiles

    def call(self) -> float:
        """Images per second of one call of the trainer."""
        start = time.perf_counter()
        self.trainer.train_steps(self.images, self.labels, self.keeps, self.eta)
        return self.images.shape[0] * BATCH / (time.perf_counter() - start)

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(p.get_value()) for p in self.network.params]


def compare(row_key: str, option: tuple[str, object], steps: int, rounds: int) -> str:
    """One row's line: both medians, their ratio and whether the weights agree."""
    plain, other = Contestant(row_key, steps, None), Contestant(row_key, steps, dict([option]))
    rates: dict[str, list[float]] = {"plain": [], "other": []}
    for _ in range(rounds):
        rates["plain"].append(plain.call())
        rates["other"].append(other.call())
    base, new = (float(np.median(rates[k])) for k in ("plain", "other"))
    same = all(np.array_equal(a, b) for a, b in zip(plain.weights(), other.weights(), strict=True))
    return (
        f"  row {row_key:3s} {base:9,.0f} images/s   with the option {new:9,.0f}   ratio {new / base:5.3f}   "
        f"weights {'the same bit for bit' if same else 'DIFFERENT'}"
    )


def main(argv=None) -> int:
    trained = [r.key for r in ROWS if r.trains]
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.flags",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--option", default=DEFAULT_OPTION, help=f"NAME=VALUE (default {DEFAULT_OPTION})")
    parser.add_argument(
        "--rows", nargs="+", default=["2", "4", "6b", "7c", "8"], help="table rows (default 2 4 6b 7c 8)"
    )
    parser.add_argument("--steps", type=int, default=300, help="mini-batches of 10 a timed call (default 300)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each, in turn (default 7)")
    args = parser.parse_args(argv)
    try:
        option = parse_option(args.option)
        unknown = [key for key in args.rows if key not in trained]
        if unknown:
            raise PipelineError(
                f"Got --rows {' '.join(unknown)}: not a trained row of the table ({', '.join(trained)})"
            )
        for name, value in (("--steps", args.steps), ("--rounds", args.rounds)):
            if value < 1:
                raise PipelineError(f"Got {name} {value}: must be at least 1")
        print(f"{args.option} against the backend's settings, batch {BATCH}, median of {args.rounds}")
        for key in args.rows:
            print(compare(key, option, args.steps, args.rounds), flush=True)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
