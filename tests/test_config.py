from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, from_section, load_config, load_params, require

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Example:
    rate: float = 0.1
    steps: int = 3
    name: str = "x"
    flag: bool = False
    items: list[str] = field(default_factory=list)
    choice: int | str = 1
    maybe: float | None = None

    def __post_init__(self):
        require(self.rate > 0, "example.rate", self.rate, "must be positive")


def test_defaults_and_coercion():
    config = from_section(
        Example, {"example": {"rate": 1, "items": ["a", "b"], "choice": "all", "maybe": 2}}, "example"
    )
    assert config.rate == 1.0 and isinstance(config.rate, float)
    assert config.items == ["a", "b"] and config.choice == "all" and config.maybe == 2.0
    assert from_section(Example, {}, "example") == Example()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"rate": -1}, r"params.yaml: Got example.rate=-1.0: must be positive"),
        ({"steps": True}, r"Got example.steps=True: expected an integer"),
        ({"flag": "yes"}, r"Got example.flag='yes': expected true or false"),
        ({"items": "a"}, r"Got example.items='a': expected a list"),
        ({"items": ["a", 3]}, r"Got example.items\[1\]=3: expected a string"),
        ({"choice": 1.5}, r"Got example.choice=1.5: expected int \| str"),
        ({"stpes": 3}, r"unknown key example.stpes \(value 3\); known keys in example: choice, flag, items, maybe"),
    ],
)
def test_errors_name_the_key_the_value_and_the_file(section, message):
    with pytest.raises(ConfigError, match=message):
        from_section(Example, {"example": section}, "example", source="params.yaml")


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"Got example=\[1, 2\]: expected a mapping"):
        from_section(Example, {"example": [1, 2]}, "example")


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file .*nope.yaml' not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text("example:\n  steps: 9\n")
    assert load_config(Example, "example", tmp_path / "ok.yaml").steps == 9


def test_repository_params_yaml_is_valid():
    """The committed params.yaml has a section for every config, and each loads."""
    from pipeline.data.download import DownloadConfig
    from pipeline.data.expand import ExpandConfig
    from pipeline.data.prepare import PrepareConfig
    from pipeline.evaluation.evaluate import EvaluateConfig
    from pipeline.nn.config import TrainConfig
    from pipeline.tracking import TrackingConfig

    sections = {
        "download": DownloadConfig,
        "prepare": PrepareConfig,
        "expand": ExpandConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "tracking": TrackingConfig,
    }
    params = load_params(ROOT / "params.yaml")
    assert set(params) == set(sections)
    for section, cls in sections.items():
        assert isinstance(from_section(cls, params, section, source="params.yaml"), cls)
