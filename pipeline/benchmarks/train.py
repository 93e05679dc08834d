"""Benchmark training: the book's two-conv ReLU network on each engine and on PyTorch.

Trains conv 20x5x5 + pool, conv 40x5x5 + pool, FC 100 (ReLU), softmax with SGD (eta 0.03, the
book's L2 term) for a fixed number of mini-batches on random images, at each batch size, on the
JAX and C engines, on theano-pymc and, when ``torch`` is installed, on PyTorch (CPU) with the
identical network and batch size, all in one run; prints images per second, the ratios to PyTorch
and, for the PyTensor engines, the fraction of the machine's GEMM peak that the training reaches: the
peak is measured in the same run (XLA's float32 2048x2048 matrix product on the same device, before
the timings and again after each batch size's: the fractions use the highest so far), the
work is the network's multiply-adds forward, for the weight gradients and for the input gradients
(none for the first layer), counted from its shapes (``Network.training_flops``). ``--device gpu`` times
the JAX engine on the GPU against PyTorch on CUDA (the C engine and theano-pymc run on the CPU only,
so they are left out). Each figure is the best of ``--repeats``
timed calls after a warm-up call (compilation is not timed).

theano-pymc lives in its own environment (``pipeline.nn.backend.THEANO_INSTALL``): run from the main
environment, its column comes from a child process on ``.venv-theano/bin/python`` (or
``--theano-python``) with the same arguments, and is left out, saying why, when that environment
does not exist. Run from the theano-pymc environment, only that engine is timed.

Where the JAX engine shares a mini-batch among the CPU devices, two more rows time it on one device
and with the devices' gradients summed by XLA's ``jax.lax.psum`` instead of ``pipeline.nn.cpu_sum``
(the same weights). ``--conv-lax`` adds a JAX run whose convolutions are a custom Op lowered to
``jax.lax.conv_general_dilated`` instead of the im2col graph (``pipeline.nn.convolution``), to show
why the graph form is the one used. ``--memory`` runs the train stage for one epoch on a synthetic
250,000-image set in a child process (``pipeline.benchmarks.stage``) and reports its peak RSS;
``--stage`` runs it for 3 epochs on 50,000 images and compares its later epochs, validation and
checkpoints included, with the benchmark's batch-10 figure of the same run, and says how much longer
its first epoch takes (compiling).
``--inference`` times inference (validation, evaluation, serving) at the device's batch
(``pipeline.nn.compiled.INFERENCE_BATCH``) against batch 500.

Goals (issue 28), on the 2-core machine: the default engine at least 2x PyTorch at batch sizes 10
and 64 and at half the GEMM peak; the train stage within 10% of the benchmark (``--stage``); peak
memory training on 250,000 images under 1.5 GB. Run it with
nothing else on the CPUs: PyTorch's threads lose much more to a busy machine than XLA's, and the ratios
come out too high.

    python -m pipeline.benchmarks.train [--steps 1000] [--batch-sizes 10 64] [--engines jax c theano-pymc]
                                        [--device cpu|gpu] [--repeats 3] [--conv-lax] [--memory] [--stage] [--inference]
                                        [--theano-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np

from pipeline.benchmarks.stage import train_stage_timings
from pipeline.core.config import PipelineError
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import DEVICES, ENGINES, THEANO_ENV, Backend, engine_unavailable
from pipeline.nn.compiled import CHUNK_LIMIT, INFERENCE_BATCH, Inference, Trainer, gradient_chunk, training_shards

ETA, LMBDA, BATCHES_PER_EPOCH = 0.03, 0.1, 5000  # the book's ReLU run: 50,000 images in batches of 10
REPO = Path(__file__).resolve().parents[2]


def random_batches(steps: int, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (steps, batch_size, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, (steps, batch_size)).astype(np.uint8)
    return images, labels


def gemm_peak(device: str = "cpu", size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of XLA's float32 size x size matrix product on ``device``, the best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    target = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    a = jax.device_put(np.random.default_rng(0).random((size, size), dtype=np.float32), target)
    product = jax.jit(lambda m: jnp.dot(m, m, precision="highest"))
    product(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def time_engine(
    engine: str,
    batch_size: int,
    steps: int,
    repeats: int,
    device: str = "cpu",
    *,
    one_device: bool = False,
    xla_sum: bool = False,
) -> float:
    """Images per second training on ``engine``; ``one_device``: the mini-batch not shared among the
    CPU devices (``pipeline.nn.data_parallel``), as before they were; ``xla_sum``: the devices' sums
    made by ``jax.lax.psum`` instead of ``pipeline.nn.cpu_sum``, as before they were."""
    network = build(resolve("conv2_relu"), rng=np.random.default_rng(0))
    backend = Backend(engine, device)
    if one_device:
        backend.cpu_devices = 1
    images, labels = random_batches(steps, batch_size)
    sums = {}
    if xla_sum:
        from pipeline.nn.cpu_sum import CHOICE_ENV  # here: theano-pymc's environment has no JAX

        sums[CHOICE_ENV] = "xla"
    with mock.patch.dict(os.environ, sums):  # read when the function compiles
        trainer = Trainer(network, backend, batch_size=batch_size, lmbda=LMBDA, num_training_batches=BATCHES_PER_EPOCH)
        trainer.train_steps(images, labels, [], ETA)  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train_steps(images, labels, [], ETA)
        best = min(best, time.perf_counter() - start)
    return steps * batch_size / best


def jax_split(network, batch_size: int, devices: int, device: str) -> str:
    """How the JAX engine splits a mini-batch: among the CPU devices, then in chunks ('' if not at all)."""
    shards = training_shards(network, batch_size, devices)
    share = batch_size // shards
    chunk = gradient_chunk(share, CHUNK_LIMIT.get(("jax", device)))
    parts = [f"on {shards} devices of {share} images"] if shards > 1 else []
    if chunk < share:
        parts.append(f"in chunks of {chunk}")
    return "; pytensor-jax " + ", each ".join(parts) if parts else ""


def stage_line(timings: dict, images: int, benchmark: float | None) -> str:
    """The train stage's epochs after the first (compiled by then) beside the benchmark's figure, and
    what the first epoch takes more than they do (compiling)."""
    first, *later = timings["epochs"]
    rates = [epoch["images_per_second"] for epoch in later]
    line = (
        f"\ntrain stage, epochs 2-{len(rates) + 1} on {images:,} images at batch 10, validation and "
        f"checkpoints included: {min(rates):,.0f}-{max(rates):,.0f} images/s"
    )
    if benchmark:
        line += f", {min(rates) / benchmark:.2f}-{max(rates) / benchmark:.2f}x the benchmark's {benchmark:,.0f}"
    extra = first["seconds"] - float(np.mean([epoch["seconds"] for epoch in later]))
    return line + f"; epoch 1 took {first['seconds']:.1f} s, {extra:.1f} s more (compiling)"


def time_in_theano_env(python: Path, batch_size: int, steps: int, repeats: int) -> float:
    """theano-pymc's figure from a child process in its own environment (it cannot share this one)."""
    command = [
        str(python),
        "-m",
        "pipeline.benchmarks.train",
        "--engines",
        "theano-pymc",
        "--json",
        "--batch-sizes",
        str(batch_size),
        "--steps",
        str(steps),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(
        command, check=True, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    ).stdout
    return json.loads(out.splitlines()[-1])[str(batch_size)]["theano-pymc"]


def time_torch(batch_size: int, steps: int, repeats: int, device: str = "cpu") -> float:
    import torch

    torch.manual_seed(0)
    where = torch.device("cuda" if device == "gpu" else "cpu")
    nn = torch.nn
    # conv -> pool -> ReLU as the book (a per-channel bias commutes with the max-pool)
    net = nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(20, 40, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(640, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    ).to(where)
    # the book's L2 term 0.5*lmbda*|W|^2/batches has gradient (lmbda/batches)*W: torch's weight_decay
    optimizer = torch.optim.SGD(net.parameters(), lr=ETA, weight_decay=LMBDA / BATCHES_PER_EPOCH)
    images, labels = random_batches(steps, batch_size)
    # on CUDA the whole batch set goes to the GPU first: PyTorch is timed without its transfers
    images, labels = torch.from_numpy(images).to(where), torch.from_numpy(labels.astype(np.int64)).to(where)

    def run():
        for i in range(steps):
            x = images[i].float().reshape(-1, 1, 28, 28) / 255.0
            loss = nn.functional.cross_entropy(net(x), labels[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if where.type == "cuda":
            torch.cuda.synchronize()  # CUDA runs asynchronously: wait for the last step

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return steps * batch_size / best


def time_jax_lax_conv(batch_size: int, steps: int, repeats: int, device: str = "cpu") -> float:
    """The JAX engine with convolutions as an Op lowered to lax.conv_general_dilated."""
    import pipeline.nn.layers as layers
    from pipeline.benchmarks.conv_lax import conv2d_lax
    from pipeline.nn.convolution import max_pool

    original = layers.conv_pool
    layers.conv_pool = lambda x, w, size: max_pool(conv2d_lax(x, w), size).dimshuffle(3, 0, 1, 2)
    try:
        return time_engine("jax", batch_size, steps, repeats, device)
    finally:
        layers.conv_pool = original


def inference_rates(
    batch_sizes: Sequence[int], repeats: int, device: str = "cpu", count: int = 10_000
) -> tuple[dict[int, tuple[float, float]], float]:
    """For each batch size, the JAX engine's inference (``Inference.probabilities``): images per
    second on ``count`` random images and seconds for one image (a served request), the sizes timed
    in turn ``repeats`` times, the best kept; and the largest difference between two batch sizes'
    probabilities (the batch is a speed setting only)."""
    network = build(resolve("conv2_relu"), rng=np.random.default_rng(0))
    backend = Backend("jax", device)
    images = np.random.default_rng(0).integers(0, 256, (count, 784), dtype=np.uint8)
    runs = {size: Inference(network, backend, batch_size=size) for size in batch_sizes}
    outputs = [run.probabilities(images) for run in runs.values()]  # compile + warm up
    difference = max(float(np.abs(out - outputs[0]).max()) for out in outputs)
    best = {(size, n): float("inf") for size in batch_sizes for n in (count, 1)}
    for _ in range(repeats):
        for (size, n), seconds in best.items():
            start = time.perf_counter()
            runs[size].probabilities(images[:n])
            best[size, n] = min(seconds, time.perf_counter() - start)
    return {size: (count / best[size, count], best[size, 1]) for size in batch_sizes}, difference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.benchmarks.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1000, help="mini-batches per timed call (default 1000)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 64])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--device",
        default="cpu",
        choices=DEVICES,
        help="cpu (default) or gpu: the JAX engine on the GPU against PyTorch on CUDA",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure; the best is kept")
    parser.add_argument("--conv-lax", action="store_true", help="also time JAX with a lax.conv convolution Op")
    parser.add_argument(
        "--memory", action="store_true", help="peak RSS of one epoch of the train stage on 250,000 images"
    )
    parser.add_argument(
        "--stage",
        action="store_true",
        help="also time the train stage (3 epochs on 50,000 images) against the benchmark at batch 10",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help=f"also time inference on 10,000 images at the device's batch (cpu {INFERENCE_BATCH['cpu']}) against 500",
    )
    parser.add_argument(
        "--theano-python",
        type=Path,
        default=REPO / THEANO_ENV / "bin" / "python",
        help=f"the theano-pymc environment's python (default: {THEANO_ENV}/bin/python)",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child process's answer
    args = parser.parse_args(argv)
    if args.device == "gpu":
        try:
            Backend("jax", "gpu")
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    engines = []
    for engine in args.engines:
        why = engine_unavailable(engine)
        if args.device == "gpu" and engine != "jax":
            print(f"{engine} not timed: it runs on the CPU only, and --device gpu was asked for")
            continue
        if not why or (engine == "theano-pymc" and args.theano_python.is_file()):  # the latter in a child process
            engines.append(engine)
        elif not args.json:
            print(f"{engine} not timed: {why}" + (f" (no {args.theano_python})" if engine == "theano-pymc" else ""))
    has_torch = False
    if not args.json:
        try:
            import torch  # noqa: F401

            has_torch = True
        except ImportError:
            print("torch is not installed (pip install '.[bench]'): no PyTorch comparison")
        if has_torch and args.device == "gpu" and not torch.cuda.is_available():
            has_torch = False
            print("torch sees no CUDA device: no PyTorch comparison on the GPU")
        print(
            f"two-conv ReLU network, {args.steps} mini-batches per call, best of {args.repeats}, "
            f"{len(os.sched_getaffinity(0))} CPUs, device {args.device}"
        )
    network = build(resolve("conv2_relu"), rng=np.random.default_rng(0))  # its counts: work, shares
    peak = flops = None
    if not args.json and "jax" in engines:
        peak = gemm_peak(args.device)
        flops = network.training_flops()
        print(
            f"GEMM peak (XLA, float32 2048x2048, {args.device}): {peak / 1e9:,.0f} GFLOP/s; the network: "
            f"{flops / 1e6:.2f} MFLOP per image per SGD step"
        )
    devices = Backend("jax", args.device).cpu_devices if "jax" in engines else 1
    shared = {bs: training_shards(network, bs, devices) > 1 for bs in args.batch_sizes}
    spin_sum = False
    if "jax" in engines and args.device == "cpu" and any(shared.values()):
        from pipeline.nn.cpu_sum import spin_sum_chosen  # here: theano-pymc's environment has no JAX

        spin_sum = spin_sum_chosen()
    table = {}
    for bs in args.batch_sizes:
        steps = max(args.steps * 10 // bs, 20)  # about the same number of images at every batch size
        if args.json:  # a child process: the parent already scaled the steps
            steps = args.steps
        results = {}
        for engine in engines:
            name = engine if engine == "theano-pymc" else f"pytensor-{engine}"
            if engine_unavailable(engine):
                results[name] = time_in_theano_env(args.theano_python, bs, steps, args.repeats)
            else:
                results[name] = time_engine(engine, bs, steps, args.repeats, args.device)
            if engine == "jax" and shared[bs]:
                results["pytensor-jax, one device"] = time_engine("jax", bs, steps, args.repeats, one_device=True)
                if spin_sum:
                    results["pytensor-jax, XLA's psum"] = time_engine("jax", bs, steps, args.repeats, xla_sum=True)
        if args.conv_lax:
            results["pytensor-jax (lax.conv Op)"] = time_jax_lax_conv(bs, steps, args.repeats, args.device)
        if has_torch:
            results["pytorch"] = time_torch(bs, steps, args.repeats, args.device)
        table[str(bs)] = results
        if args.json:
            continue
        split = jax_split(network, bs, devices, args.device) if "jax" in engines else ""
        print(f"\nbatch size {bs} ({steps} mini-batches{split}):")
        if peak:  # again after these timings: a shared machine may have been slow for the first one
            again = gemm_peak(args.device)
            peak = max(peak, again)
            print(
                f"  GEMM peak again: {again / 1e9:,.0f} GFLOP/s; "
                f"the fractions below use the run's best, {peak / 1e9:,.0f}"
            )
        for name, rate in results.items():
            ratio = f"  {rate / results['pytorch']:.2f}x pytorch" if has_torch else ""
            if peak and name.startswith("pytensor-"):
                ratio += f"  {rate * flops / peak:5.1%} of the GEMM peak"
            print(f"  {name:<28} {rate:>9,.0f} images/s{ratio}")
    if args.json:
        print(json.dumps(table))
    if args.inference:
        sizes = sorted({INFERENCE_BATCH[args.device], 500})
        rates, difference = inference_rates(sizes, args.repeats, args.device)
        print(f"\ninference, 10,000 images (pytensor-jax, {args.device}; probabilities differ by {difference:.1e}):")
        for size, (rate, one) in rates.items():
            print(
                f"  batch {size:<4} {rate:>9,.0f} images/s  {rate / rates[500][0]:.2f}x batch 500;"
                f"  one image {1000 * one:.1f} ms"
            )
    if args.stage:
        timings = train_stage_timings(50_000, 10, epochs=3)
        print(stage_line(timings, 50_000, table.get("10", {}).get("pytensor-jax")))
    if args.memory:
        summary = train_stage_timings(250_000, 10)
        print(
            f"\ntrain stage, one epoch on 250,000 images: peak RSS {summary['peak_rss_mb']:.0f} MB "
            f"({summary['images_per_second']:,.0f} images/s, goal: under 1536 MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
