"""The training benchmark's command line (the timings themselves are printed, not asserted)."""

import pytest

from pipeline.benchmarks import train as bench
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
