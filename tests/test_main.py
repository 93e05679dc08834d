import subprocess
import sys

import pytest

from pipeline.__main__ import STAGES


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)


def test_help_lists_every_stage():
    result = run("--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert f"  {stage} " in result.stdout


@pytest.mark.parametrize("stage", ["download", "prepare", "expand"])
def test_each_stage_has_help(stage):
    result = run(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert f"python -m pipeline {stage}" in result.stdout and "--params" in result.stdout


def test_unknown_stage():
    result = run("trian")
    assert result.returncode == 2
    assert "unknown stage 'trian'" in result.stderr


def test_a_stage_without_an_engine_to_import_says_so_in_one_line():
    # None in sys.modules makes an import fail, as in an environment without the package
    code = (
        "import sys; sys.modules['pytensor'] = sys.modules['theano'] = None; "
        "from pipeline.__main__ import main; sys.exit(main(['train', '--help']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: neither PyTensor (import of pytensor halted")
    assert "nor theano-pymc (import of theano halted" in lines[0] and "pip install -e ." in lines[0]


def test_bad_params_stop_the_stage_with_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text("expand:\n  max_shift: -2\n")
    result = run("expand", "--params", str(tmp_path / "params.yaml"), "--train", str(tmp_path / "missing.npz"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'params.yaml'}: Got expand.max_shift=-2: must be 0..13 pixels"
