"""The --jobs benchmark's command line (the timings themselves are printed, not asserted)."""

import re
from pathlib import Path

import pytest

from pipeline.benchmarks import jobs as bench
from pipeline.nn.backend import jax_gpus

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_both_modes_train_every_network_and_the_ratio_is_printed(capsys, monkeypatch):
    trained = []
    real_run_mode = bench.run_mode

    def run_mode(row, **kwargs):  # the real one, noting what it trained
        seconds = real_run_mode(row, **kwargs)
        trained.append((kwargs["jobs"], sorted(p.parent.name for p in kwargs["out"].glob("seed*/result.json"))))
        return seconds

    monkeypatch.setattr(bench, "run_mode", run_mode)
    args = ["--params", str(PARAMS), "--row", "1", "--networks", "2", "--epochs", "1", "--images", "300"]
    assert bench.main(args) == 0
    assert trained == [(1, ["seed1", "seed2"]), (2, ["seed1", "seed2"])]
    out = capsys.readouterr().out
    one = float(re.search(r"one at a time \(--jobs 1\): +([\d.]+) s", out).group(1))
    many = float(re.search(r"2 at once \(--jobs 2\): +([\d.]+) s", out).group(1))
    ratio = float(re.search(r"speed-up: ([\d.]+)x", out).group(1))
    assert abs(ratio - one / many) < 0.02 * ratio + 0.01  # the printed times are rounded


def test_bad_arguments_are_named(capsys):
    assert bench.main(["--params", str(PARAMS), "--row", "9"]) == 2
    assert "Got --row '9': not a training row of the table (1, 2, 3" in capsys.readouterr().err
    assert bench.main(["--params", str(PARAMS), "--networks", "3", "--jobs", "1"]) == 2
    assert "Got --jobs 1: must be at least 2" in capsys.readouterr().err


@pytest.mark.skipif(bool(jax_gpus()), reason="a GPU is there, so --device gpu would run the benchmark")
def test_device_gpu_without_a_gpu_stops_before_any_training(capsys, monkeypatch):
    monkeypatch.setattr(bench, "make_data", lambda *a: pytest.fail("made data for a GPU that is not there"))
    assert bench.main(["--params", str(PARAMS), "--device", "gpu"]) == 2
    assert "device gpu was asked for, but JAX sees no GPU" in capsys.readouterr().err
