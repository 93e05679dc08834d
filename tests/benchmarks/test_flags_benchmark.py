"""The XLA option benchmark: its option reaches the compiler, the backend's copy insertion setting, and
its command line (the timings themselves are printed, not asserted)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from pipeline.benchmarks import flags as bench
from pipeline.core.config import PipelineError
from pipeline.nn.backend import COPY_ANALYSIS_FLAG


def sgd_loop(w1, w2, xs):
    """Two dense layers trained by SGD in a scan: ``w2`` is read forward and backward, then updated."""

    def step(weights, x):
        w1, w2 = weights
        h = jnp.maximum(x @ w1, 0)
        y = h @ w2
        gh = (y @ w2.T) * (h > 0)
        return (w1 - 0.1 * (x.T @ gh), w2 - 0.1 * (h.T @ y)), y.sum()

    return lax.scan(step, (w1, w2), xs)


def weight_copies(options: dict | None) -> int:
    """How many copies of the (64, 64) weight matrix the compiled loop makes."""
    args = (jnp.zeros((32, 64)), jnp.zeros((64, 64)), jnp.ones((5, 10, 32)))
    with bench.compiled_with(options):
        text = jax.jit(sgd_loop).lower(*args).compile().as_text()
    return sum(" copy(" in line and "f32[64,64]" in line for line in text.splitlines())


def test_the_option_reaches_the_compiler_and_the_backends_setting_saves_a_copy_per_step():
    name = COPY_ANALYSIS_FLAG.removeprefix("--")
    default, off, on = weight_copies(None), weight_copies({name: False}), weight_copies({name: True})
    assert default == on < off  # the copy inside the loop, made by XLA's copy insertion without region analysis


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("xla_cpu_enable_fast_min_max=true", ("xla_cpu_enable_fast_min_max", True)),
        ("--xla_cpu_copy_insertion_use_region_analysis=False", ("xla_cpu_copy_insertion_use_region_analysis", False)),
        ("xla_cpu_parallel_codegen_split_count=32", ("xla_cpu_parallel_codegen_split_count", 32)),
        ("xla_cpu_max_isa=AVX2", ("xla_cpu_max_isa", "AVX2")),
    ],
)
def test_an_option_is_a_name_and_a_typed_value(text, parsed):
    assert bench.parse_option(text) == parsed


@pytest.mark.parametrize("text", ["xla_cpu_enable_fast_min_max", "fast_min_max=true", "xla_cpu_max_isa="])
def test_a_malformed_option_is_named(text):
    with pytest.raises(PipelineError, match=re.escape(f"Got --option {text!r}: expected NAME=VALUE")):
        bench.parse_option(text)


def test_a_row_is_timed_both_ways_and_its_weights_compared(capsys):
    assert bench.main(["--rows", "1", "--steps", "20", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{COPY_ANALYSIS_FLAG.removeprefix('--')}=false against the backend's settings")
    line = re.search(r"row 1 +([\d,]+) images/s +with the option +([\d,]+) +ratio ([\d.]+) +weights (.+)", out)
    base, other, ratio = (float(line.group(i).replace(",", "")) for i in (1, 2, 3))
    assert abs(ratio - other / base) < 0.002 and line.group(4) == "the same bit for bit"


def test_bad_arguments_are_named(capsys):
    assert bench.main(["--rows", "9"]) == 2
    assert "Got --rows 9: not a trained row of the table (1, 2, 3" in capsys.readouterr().err
    assert bench.main(["--rounds", "0"]) == 2
    assert "Got --rounds 0: must be at least 1" in capsys.readouterr().err
