import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.config import ConfigError, from_section
from pipeline.core.files import load_npz
from pipeline.data.idx import MAX_DATA_BYTES, write_idx
from pipeline.data.prepare import SOURCES, PrepareConfig, prepare

from synthetic import write_mnist


def test_split_is_first_train_and_last_validation(tmp_path):
    arrays = write_mnist(tmp_path / "raw", n_train=100, n_test=20)
    summary = prepare(
        config=PrepareConfig(train_size=70, validation_size=20), raw_dir=tmp_path / "raw", out_dir=tmp_path / "out"
    )

    train = load_npz(tmp_path / "out" / "train.npz")
    validation = load_npz(tmp_path / "out" / "validation.npz")
    test = load_npz(tmp_path / "out" / "test.npz")
    np.testing.assert_array_equal(train["images"], arrays["train_images"][:70])
    np.testing.assert_array_equal(train["labels"], arrays["train_labels"][:70])
    np.testing.assert_array_equal(validation["images"], arrays["train_images"][80:])
    np.testing.assert_array_equal(validation["labels"], arrays["train_labels"][80:])
    np.testing.assert_array_equal(test["images"], arrays["test_images"])
    np.testing.assert_array_equal(test["labels"], arrays["test_labels"])
    assert train["images"].dtype == np.uint8 and train["images"].shape == (70, 28, 28)

    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert recorded == summary
    for name, labels in [
        ("train", arrays["train_labels"][:70]),
        ("validation", arrays["train_labels"][80:]),
        ("test", arrays["test_labels"]),
    ]:
        assert summary[name] == {"count": len(labels), "label_counts": np.bincount(labels, minlength=10).tolist()}


def test_a_split_of_exactly_all_the_images_is_accepted(tmp_path):
    """45 + 5 of 50: the two parts meet, with no image in both and none left out."""
    arrays = write_mnist(tmp_path / "raw", n_train=50, n_test=10)
    prepare(config=PrepareConfig(train_size=45, validation_size=5), raw_dir=tmp_path / "raw", out_dir=tmp_path / "out")
    train = load_npz(tmp_path / "out" / "train.npz")
    validation = load_npz(tmp_path / "out" / "validation.npz")
    np.testing.assert_array_equal(np.concatenate([train["images"], validation["images"]]), arrays["train_images"])


def test_split_one_image_larger_than_the_data_is_refused_before_writing(tmp_path):
    write_mnist(tmp_path / "raw", n_train=50, n_test=10)
    with pytest.raises(ConfigError) as error:
        prepare(
            config=PrepareConfig(train_size=45, validation_size=6), raw_dir=tmp_path / "raw", out_dir=tmp_path / "out"
        )
    assert str(error.value) == (
        "Got prepare.train_size=45 + prepare.validation_size=6 = 51: more than the 50 training images"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"validation_size": 0}, r"Got prepare.validation_size=0: must be positive"),
        ({"train_size": 0}, r"Got prepare.train_size=0: must be positive"),
        ({"train_size": "many"}, r"Got prepare.train_size='many': expected an integer"),
        ({"train_size": 10.5}, r"Got prepare.train_size=10.5: expected an integer"),
        ({"valdation_size": 3}, r"unknown key prepare.valdation_size \(value 3\)"),
    ],
)
def test_bad_params_name_key_and_value(section, message):
    with pytest.raises(ConfigError, match=message):
        from_section(PrepareConfig, {"prepare": section}, "prepare", source="params.yaml")


def prepare_cli(tmp_path, raw, out=None) -> subprocess.CompletedProcess:
    """``python -m pipeline prepare`` in ``tmp_path`` with its params.yaml."""
    args = ["--params", str(tmp_path / "params.yaml"), "--raw", str(raw)] + (["--out", str(out)] if out else [])
    command = [sys.executable, "-m", "pipeline", "prepare", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)


def test_cli_reports_missing_raw_files(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare: {train_size: 10, validation_size: 5}\n")
    result = prepare_cli(tmp_path, tmp_path / "nothing")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'nothing'}: missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (run `python -m pipeline download` first)"
    ]


@pytest.mark.parametrize("which", ["train", "test"])
def test_cli_refuses_images_that_are_not_28x28_and_writes_nothing(tmp_path, which):
    write_mnist(tmp_path / "raw", n_train=20, n_test=10)
    images_file = SOURCES[which][0]
    count = 20 if which == "train" else 10
    write_idx(tmp_path / "raw" / images_file, np.zeros((count, 32, 32), dtype=np.uint8))
    (tmp_path / "params.yaml").write_text("prepare: {train_size: 10, validation_size: 5}\n")
    out = tmp_path / "out"
    result = prepare_cli(tmp_path, tmp_path / "raw", out)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'raw' / images_file}: images of 32x32 pixels (header shape ({count}, 32, 32)); "
        "expected 28x28, the size of MNIST's images and of the networks' input"
    ]
    assert not out.exists()


def test_cli_refuses_a_header_declaring_one_image_too_many_in_one_line(tmp_path):
    """342,393 images of 28x28 is one past the bytes a header may declare; the file itself is tiny."""
    write_mnist(tmp_path / "raw", n_train=20, n_test=10)
    count = MAX_DATA_BYTES // 784 + 1
    images_file = tmp_path / "raw" / SOURCES["train"][0]
    images_file.write_bytes(gzip.compress(struct.pack(">4I", 0x803, count, 28, 28) + bytes(784)))
    (tmp_path / "params.yaml").write_text("prepare: {train_size: 10, validation_size: 5}\n")
    result = prepare_cli(tmp_path, tmp_path / "raw", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {images_file}: header declares shape ({count}, 28, 28) = {count * 784} bytes of data, more than "
        "the 268435456 an MNIST-format file may have here; refused before reading it"
    ]
    assert not (tmp_path / "out").exists()
