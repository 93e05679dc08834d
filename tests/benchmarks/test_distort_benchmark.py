"""The distortion benchmark's command line (the timings themselves are printed, not asserted)."""

import re

from pipeline.benchmarks import distort as bench


def test_it_compares_with_the_scipy_recipe_and_prints_the_ratio_and_the_epoch_cost(capsys):
    assert bench.main(["--images", "1500", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    old, new, ratio = re.search(
        r"scipy recipe ([\d.]+) s, pipeline.data.distort ([\d.]+) s: ([\d.]+)x faster", out
    ).groups()
    assert abs(float(ratio) - float(old) / float(new)) < 0.1 * float(ratio) + 0.1  # the printed times are rounded
    assert "same bytes: True" in out
    assert re.search(r"[\d.]+ s per 250,000-image epoch; in \d+ threads [\d.]+ s", out)
