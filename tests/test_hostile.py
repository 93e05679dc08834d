"""Hostile and unlucky inputs beyond the IDX, model and serving checks of their own test files.

Each is answered by one line naming the file, option or variable and quoting the bad value, exit
status 1, no traceback, and no output left behind. The stages run as subprocesses where those three
properties are the point; the library functions are called directly where the message is.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ConfigError, PipelineError, load_params
from pipeline.core.files import load_npz, write_json
from pipeline.data.splits import load_split
from pipeline.nn.checkpoint import load_checkpoint
from pipeline.sweep.space import parse_space
from pipeline.tracking.store import TrackingConfig, TrackingError, load_run_reference, tracked_run

from synthetic import write_mnist, write_prepared

ROOT = Path(__file__).resolve().parents[1]
IMAGES = np.zeros((20, 28, 28), np.uint8)


def stage(cwd: Path, *args: str, **env: str) -> list[str]:
    """Run ``python -m pipeline *args`` in ``cwd``; it must fail with status 1 and no traceback. Its stderr lines."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},  # this checkout's package, wherever cwd is
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def truncated(path: Path) -> Path:
    data = write_npz(path, images=IMAGES, labels=np.zeros(20, np.uint8)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def lone_npy(path: Path) -> Path:
    with open(path, "wb") as f:
        np.save(f, IMAGES)
    return path


def object_labels(path: Path) -> Path:
    return write_npz(path, images=IMAGES, labels=np.array([None] * 20, dtype=object))


@pytest.mark.parametrize(
    "content, says",
    [
        (b"prepare:\n  train_size: \xff\xfe\n", "not valid YAML: unacceptable character #x00ff: invalid start byte in"),
        (b"prepare: " + b"[" * 100_000 + b"]" * 100_000, "not valid YAML: nested deeper than"),
    ],
    ids=["not-utf8", "nested"],
)
def test_params_that_cannot_be_decoded_are_one_line(tmp_path, content, says):
    write_mnist(tmp_path / "raw")
    (tmp_path / "params.yaml").write_bytes(content)
    (line,) = stage(tmp_path, "prepare", "--raw", "raw", "--out", "out")
    assert line.startswith("error: params.yaml: ") and says in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "make, says",
    [
        (truncated, "not an .npz file"),
        (lone_npy, "not an .npz file"),
        (object_labels, "cannot read the arrays (ValueError: Object arrays cannot be loaded"),
    ],
    ids=["truncated", "lone-npy", "object-array"],
)
def test_a_damaged_npz_is_one_line_naming_it(tmp_path, make, says):
    bad = make(tmp_path / "train.npz")
    (tmp_path / "params.yaml").write_text("expand: {}\n")
    (line,) = stage(tmp_path, "expand", "--train", "train.npz", "--out", "out")
    assert line.startswith("error: train.npz: ") and says in line, line
    assert not (tmp_path / "out").exists()
    # a ValueError too, as numpy's refusals are: load_checkpoint ignores a damaged checkpoint for it
    with pytest.raises(ValueError, match=re.escape(says)):
        load_npz(bad)


def test_a_truncated_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.nn.checkpoint"):
        assert load_checkpoint(truncated(tmp_path / "checkpoint.npz"), "fingerprint", epochs=3) is None
    assert "ignoring unreadable checkpoint" in caplog.text and "not an .npz file" in caplog.text


@pytest.mark.parametrize(
    "labels, says",
    [
        (np.full(20, -1, np.int8), "label -1 at index 0 is not a digit 0-9 (20 such labels)"),
        (np.full(20, 3.7), "labels must be integer digits 0-9, got dtype float64"),
        (np.zeros((20, 1), np.uint8), r"one label per image, shape (20,), got shape (20, 1)"),
    ],
    ids=["negative", "float", "2-d"],
)
def test_labels_that_are_not_digits_are_refused(tmp_path, labels, says):
    path = write_npz(tmp_path / "train.npz", images=IMAGES, labels=labels)
    with pytest.raises(PipelineError) as error:
        load_split(path)
    assert str(error.value) == f"{path}: {says}"
    (tmp_path / "params.yaml").write_text("expand: {}\n")
    assert stage(tmp_path, "expand", "--train", "train.npz", "--out", "out") == [f"error: train.npz: {says}"]
    assert not (tmp_path / "out").exists()
    # the test set too, before a model is loaded or a run opened (the model here does not even exist)
    evaluate = ("evaluate", "--test", "train.npz", "--model", "model", "--out", "out", "--metrics", "out/m.json")
    assert stage(tmp_path, *evaluate) == [f"error: train.npz: {says}"]
    assert not (tmp_path / "out").exists()


def test_expand_refuses_images_that_are_not_28x28(tmp_path):
    write_npz(tmp_path / "train.npz", images=np.zeros((20, 784), np.uint8), labels=np.zeros(20, np.uint8))
    (tmp_path / "params.yaml").write_text("expand: {}\n")
    assert stage(tmp_path, "expand", "--train", "train.npz", "--out", "out") == [
        "error: train.npz: images must be uint8 (N, 28, 28), got uint8 (20, 784)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mirror, says",
    [
        ("http://[::1/", "not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:99999/", "not a valid URL (Port out of range 0-65535)"),
        ("http://127.0.0.1:port/", "not a valid URL (Port could not be cast to integer value as 'port')"),
        ("~no-such-user-here/mnist", "not a usable path (Could not determine home directory.)"),
    ],
)
def test_a_mirror_that_is_no_url_or_path_is_refused_naming_it(tmp_path, mirror, says):
    (tmp_path / "params.yaml").write_text("download: {mirrors: [/nowhere], retries: 0}\n")
    assert stage(tmp_path, "download", "--out", "raw", MNIST_MIRROR=mirror) == [
        f"error: Got MNIST_MIRROR={mirror!r}: {says}"
    ]
    assert not (tmp_path / "raw").exists()


def test_a_mirror_path_with_a_nul_byte_is_refused_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text('download: {mirrors: ["/data\\x00/mnist"]}\n')
    assert stage(tmp_path, "download", "--out", "raw") == [
        "error: params.yaml: Got download.mirrors[0]='/data\\x00/mnist': not a usable path (it holds a NUL byte)"
    ]


def test_a_mirror_path_too_long_for_the_system_is_skipped_like_any_bad_mirror(tmp_path):
    (tmp_path / "params.yaml").write_text("download: {mirrors: [/nowhere], retries: 0}\n")
    lines = stage(tmp_path, "download", "--out", "raw", MNIST_MIRROR="m" * 5000)
    assert lines[-1] == "Offline? Set MNIST_MIRROR to a directory holding the four files."
    assert any("File name too long" in line for line in lines), lines


@pytest.mark.parametrize(
    "stage_args",
    [
        ["download", "--out", "taken"],
        ["prepare", "--raw", "raw", "--out", "taken"],
        ["prepare", "--raw", "raw", "--out", "taken/below"],
    ],
    ids=["download", "prepare", "below-a-file"],
)
def test_an_output_directory_that_is_a_file_is_one_line(tmp_path, stage_args):
    write_mnist(tmp_path / "raw")
    (tmp_path / "taken").write_text("a file where a directory should go\n")
    (tmp_path / "params.yaml").write_text(
        "download: {mirrors: [raw]}\nprepare: {train_size: 100, validation_size: 20}\n"
    )
    (line,) = stage(tmp_path, *stage_args)
    assert line.startswith(f"error: cannot create the directory '{stage_args[-1]}") and line.endswith(
        ("File exists", "Not a directory")
    ), line
    assert (tmp_path / "taken").read_text() == "a file where a directory should go\n"


def test_an_output_file_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(PipelineError, match=rf"cannot write '{tmp_path / 'summary.json'}': Is a directory"):
        write_json(tmp_path / "summary.json", {"a": 1})
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left beside it


@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"run_id": ', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected an object with a run_id, got list"),
        (b'{"run_id": ["x"]}', "run_id=['x'] is not an MLflow run id"),
        (b'{"run_id": "../../x"}', "run_id='../../x' is not an MLflow run id"),
    ],
)
def test_a_malformed_run_file_is_one_line_naming_it(tmp_path, content, says):
    run_file = tmp_path / "mlflow_run.json"
    run_file.write_bytes(content)
    with pytest.raises(TrackingError, match=f"{run_file}: " + says.replace("[", r"\[").replace("]", r"\]")):
        load_run_reference(run_file)
    write_prepared(tmp_path, sizes={"test": 20})
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")
    args = ["--model", "model", "--test", "test.npz", "--out", "out", "--metrics", "out/m.json"]
    (line,) = stage(tmp_path, "evaluate", *args, "--run-file", "mlflow_run.json")
    assert line.startswith("error: mlflow_run.json: ") and says in line, line
    assert not (tmp_path / "out").exists()


def test_a_well_formed_run_file_is_still_read(tmp_path):
    (tmp_path / "mlflow_run.json").write_text('{"run_id": "0123456789abcdef0123456789abcdef", "other": 1}')
    assert load_run_reference(tmp_path / "mlflow_run.json") == "0123456789abcdef0123456789abcdef"
    assert load_run_reference(tmp_path / "missing.json") is None


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_a_range_with_absurdly_many_values_is_refused_before_typing_them(params):
    with pytest.raises(ConfigError) as error:
        parse_space(["train.epochs=range(1,100000000)"], params, source="params.yaml")
    assert str(error.value) == (
        "-S train.epochs=range(1,100000000) (params.yaml): gives more than the 1,000 values a sweep's "
        "override may have: narrow it"
    )


def test_a_grid_of_absurdly_many_trainings_is_refused_before_listing_them(params):
    space = parse_space(["train.epochs=range(1,101)", "train.seed=range(1,101)"], params, source="params.yaml")
    with pytest.raises(ConfigError) as error:
        space.grid()
    assert str(error.value) == (
        "-S train.epochs=range(1,101) -S train.seed=range(1,101) (params.yaml): a grid of 100 x 100 = 10,000 "
        "trainings, more than the 1,000 a grid may have: narrow the values, or sample them with "
        "--search optuna --trials N"
    )


@pytest.mark.parametrize(
    "variable, value, says",
    [
        (
            "MLFLOW_TRACKING_URI",
            "ftp://example.org/store",
            "MLflow store MLFLOW_TRACKING_URI='ftp://example.org/store'",
        ),
        ("MLFLOW_TRACKING_URI", "just words", "MLflow store MLFLOW_TRACKING_URI='just words'"),
        ("PIPELINE_TRACKING_RETRY_S", "soon", "Got PIPELINE_TRACKING_RETRY_S='soon': expected a number of seconds"),
        ("PIPELINE_TRACKING_RETRY_S", "-1", "Got PIPELINE_TRACKING_RETRY_S='-1': expected a number of seconds"),
    ],
)
def test_a_tracking_variable_that_cannot_be_used_is_refused_before_the_run(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(TrackingError) as error, tracked_run(TrackingConfig(enabled=True)):
        pytest.fail("the run opened")
    assert str(error.value).startswith(says) and "\n" not in str(error.value), error.value
