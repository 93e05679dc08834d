"""The training benchmark's command line (the timings themselves are printed, not asserted)."""

import numpy as np
import pytest

from pipeline.benchmarks import train as bench
from pipeline.nn.architecture import build, resolve
from pipeline.nn.backend import jax_gpus


@pytest.mark.skipif(bool(jax_gpus()), reason="a GPU is there, so --device gpu would run the benchmark")
def test_device_gpu_without_a_gpu_stops_with_the_reason(capsys):
    assert bench.main(["--device", "gpu", "--steps", "20", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "device gpu was asked for, but JAX sees no GPU" in err


def test_the_jax_engine_is_timed_and_reported(capsys):
    assert bench.main(["--engines", "jax", "--batch-sizes", "10", "--steps", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out
    rate = next(line for line in out.splitlines() if line.strip().startswith("pytensor-jax"))
    assert float(rate.split()[1].replace(",", "")) > 0
    # the two CPU devices of the tests (tests/conftest.py) share each mini-batch; one device beside them
    assert "batch size 10 (20 mini-batches; pytensor-jax on 2 devices of 5 images):" in out
    one = next(line for line in out.splitlines() if line.strip().startswith("pytensor-jax, one device"))
    assert float(one.split()[3].replace(",", "")) > 0


@pytest.mark.parametrize(
    "batch, devices, split",
    [
        (10, 2, "; pytensor-jax on 2 devices of 5 images"),
        (64, 2, "; pytensor-jax on 2 devices of 32 images, each in chunks of 8"),
        (64, 1, "; pytensor-jax in chunks of 8"),
        (16, 1, "; pytensor-jax in chunks of 8"),  # exactly at the chunk limit: two chunks
        (15, 1, ""),  # one under it, with no divisor from 8 but itself: not cut
        (9, 2, ""),
    ],
)
def test_the_header_says_how_the_jax_engine_splits_a_mini_batch(batch, devices, split):
    network = build(resolve("conv2_relu"), rng=np.random.default_rng(0))
    assert bench.jax_split(network, batch, devices, "cpu") == split


def test_inference_is_timed_at_each_batch_size_and_the_probabilities_agree():
    # 520 images: 26 full batches of 20; one full batch of 500 and one padded with 480 blank images
    rates, difference = bench.inference_rates([20, 500], repeats=1, count=520)
    assert sorted(rates) == [20, 500] and all(rate > 0 and one > 0 for rate, one in rates.values())
    assert difference <= 1e-6


def test_the_fraction_of_the_gemm_peak_is_the_rate_times_the_work_over_the_peak(capsys):
    assert bench.main(["--engines", "jax", "--batch-sizes", "10", "--steps", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    first = float(out.split("GEMM peak (")[1].split("):")[1].split("GFLOP/s")[0].replace(",", ""))
    again = float(out.split("GEMM peak again: ")[1].split(" GFLOP/s")[0].replace(",", ""))
    peak = float(out.split("the run's best, ")[1].split()[0].replace(",", ""))
    assert peak == max(first, again) > 0  # measured before and after the timings, the higher one used
    line = next(line for line in out.splitlines() if line.strip().startswith("pytensor-jax")).split()
    rate = float(line[1].replace(",", ""))
    percent = float(next(word for word in line if word.endswith("%")).rstrip("%"))
    assert percent == pytest.approx(100 * rate * 9.222e6 / (peak * 1e9), rel=0.01, abs=0.06)


def test_the_stage_line_puts_the_epochs_after_the_first_beside_the_benchmark_and_the_first_epochs_extra_time():
    timings = {
        "epochs": [
            {"images_per_second": 100.0, "seconds": 500.0},
            {"images_per_second": 900.0, "seconds": 55.6},
            {"images_per_second": 1100.0, "seconds": 45.4},
        ]
    }
    line = bench.stage_line(timings, 50_000, 1000.0)
    assert line.strip() == (
        "train stage, epochs 2-3 on 50,000 images at batch 10, validation and checkpoints included: "
        "900-1,100 images/s, 0.90-1.10x the benchmark's 1,000; epoch 1 took 500.0 s, 449.5 s more (compiling)"
    )
    assert "x the benchmark" not in bench.stage_line(timings, 50_000, None)  # no batch-10 figure in the run


def test_the_train_stage_runs_in_a_child_process_and_reports_each_epoch():
    from pipeline.benchmarks.stage import train_stage_timings

    timings = train_stage_timings(400, 10, epochs=2)
    assert [epoch["epoch"] for epoch in timings["epochs"]] == [1, 2]
    assert all(epoch["images_per_second"] > 0 for epoch in timings["epochs"])
    assert timings["peak_rss_mb"] > 0
