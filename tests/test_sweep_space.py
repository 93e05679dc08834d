"""The sweep's search space against DVC itself: the same points in the same order as ``dvc exp run
--queue -S``, each params.yaml as DVC would write it; every refusal one line naming its override;
Optuna's distributions for each syntax."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from dvc.exceptions import InvalidArgumentError
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from pipeline.core.config import ConfigError, PipelineError, from_section, load_params
from pipeline.nn.config import TrainConfig
from pipeline.sweep.space import parse_space

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
SIGMOID_NET = (
    "[{type: fully_connected, n_in: 784, n_out: 30, activation: sigmoid}, {type: softmax, n_in: 30, n_out: 10}]"
)


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS)


def typed(value):
    """``value`` with the type of every leaf beside it: 1 and 1.0 and True differ."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def refusal(overrides, params, source="params.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        parse_space(overrides, params, source).grid()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.eta=0.1,0.03", "train.epochs=range(1,4)", "train.architecture=shallow"],
        ["train.lmbda=range(0.0,0.3,0.1)", "train.shuffle=true,false", "train.momentum=0", "+extra.note=a b"],
        ["train.init=choice(corrected,book)", "tracking.experiment=sweep-a,sweep-b", "train.seed=sort(3,1,2)"],
        [f"params.yaml:train.architecture=conv2_relu,{SIGMOID_NET}", "train.batch_size=range(20,5,-5)"],
    ],
    ids=["choice-range-fixed", "floats-bools-added-key", "choice-tracking-sort", "file-prefix-lists"],
)
def test_the_grid_is_dvcs_queue_point_by_point(overrides, params, tmp_path):
    """The points of `dvc exp run --queue -S ...` in its order, each params.yaml as DVC writes it."""
    space = parse_space(overrides, params)
    ours = space.grid()
    dvcs = get_hydra_sweeps(to_path_overrides(overrides))
    assert len(ours) == len(dvcs) > 1
    for point, dvc_point in zip(ours, dvcs):
        written = tmp_path / "params.yaml"
        shutil.copy(PARAMS, written)
        apply_overrides(written, dvc_point["params.yaml"])
        assert typed(space.apply(params, point)) == typed(load_params(written)), space.describe(point)


def test_a_grid_point_holds_the_swept_keys_first_slowest(params):
    space = parse_space(["train.eta=0.1,0.03", "train.momentum=0.5", "train.epochs=range(1,3)"], params)
    assert space.grid() == [
        {"train.eta": 0.1, "train.epochs": 1},
        {"train.eta": 0.1, "train.epochs": 2},
        {"train.eta": 0.03, "train.epochs": 1},
        {"train.eta": 0.03, "train.epochs": 2},
    ]
    assert space.fixed() == {"train.momentum": 0.5}
    assert parse_space([], params).grid() == [{}]


@pytest.mark.parametrize(
    "override, why",
    [
        ("train.etaa=0.1", "no key 'train.etaa' in params.yaml (keys in train: dataset, architecture"),
        ("train.eta=abc", "Got train.eta='abc': expected a number"),
        ("train.eta=0.1,-1", "Got train.eta=-1.0: the learning rate must be positive"),
        ("train.epochs=range(0,3)", "Got train.epochs=0: must be at least 1"),
        ("train.epochs=range(5,1)", "gives no value"),
        ("train.eta=0.1,", "not an override: mismatched input '<EOF>'"),
        ("+train.eta=0.1", "An item is already at 'train.eta'"),
        ("+train.speed=2", "unknown key train.speed (value 2)"),
        ("expand.max_shift=2", "no training reads expand"),
        ("evaluate.test_time_shifts=1", "no training reads evaluate"),
        ("~train.momentum", "deleting a key (~) is not supported"),
        ("train.lmbda=${train.eta}", "interpolations (${...}) are not supported"),
        ("tracking.experiment=' '", "Got tracking.experiment=' ': must not be empty"),
        ("train.architecture=chapter1", "Got train.cost='log-likelihood': cost log-likelihood needs a softmax"),
        ("other.yaml:train.eta=0.1", "a sweep sets values of params.yaml only, not of other.yaml"),
        ("train.eta=interval(0.01,0.1)", "a grid needs a finite list"),
        ("train.epochs=interval(1,10)", "Got train.epochs=1.0: expected an integer"),
    ],
)
def test_a_refusal_is_one_line_quoting_the_override(override, why, params):
    message = refusal(["train.seed=1,2", override], params)
    assert message.startswith(f"-S {override} (params.yaml): "), message
    assert why in message, message


def test_a_glob_is_refused_as_dvc_refuses_it(params):
    override = "train.architecture=glob(conv*)"
    with pytest.raises(InvalidArgumentError, match="Glob override"):
        get_hydra_sweeps(to_path_overrides([override]))
    assert refusal([override], params).startswith(f"-S {override} (params.yaml): glob(...)")


@pytest.mark.parametrize("override", ["train.etaa=0.1", "+extra.note=x", "+train.eta=0.1", "++train.eta=0.1"])
def test_which_keys_exist_is_dvcs_struct_mode(override, params, tmp_path):
    written = tmp_path / "params.yaml"
    shutil.copy(PARAMS, written)
    try:
        apply_overrides(written, [override])
        dvc_accepts = True
    except InvalidArgumentError:
        dvc_accepts = False
    try:
        parse_space([override], params)
        we_accept = True
    except ConfigError:
        we_accept = False
    assert we_accept == dvc_accepts


def test_a_bad_combination_names_the_override_and_the_point(params):
    message = refusal(["train.architecture=chapter1,chapter3", "train.cost=quadratic,log-likelihood"], params)
    assert message.startswith(
        "-S train.cost=quadratic,log-likelihood (params.yaml): with train.architecture=chapter1: "
        "Got train.cost='log-likelihood'"
    ), message
    # the same values, each given once, fit together
    assert parse_space(["train.architecture=chapter1", "train.cost=quadratic"], params).grid() == [{}]


def test_each_key_once(params):
    message = refusal(["train.eta=0.1", "train.eta=0.2,0.3"], params)
    assert message.startswith("-S train.eta=0.1 -S train.eta=0.2,0.3 (params.yaml): both set train.eta")
    assert "both set train.eta" in refusal(["train={eta: 0.1}", "train.eta=0.2,0.3"], params)


def test_a_bad_params_file_is_blamed_on_the_file_unless_an_override_mends_it(params):
    broken = {**params, "train": {**params["train"], "eta": -1}}
    message = refusal(["train.seed=1,2"], broken, source="exp/params.yaml")
    assert message.startswith("exp/params.yaml: Got train.eta=-1.0"), message
    assert parse_space(["train.eta=0.1,0.2"], broken, source="exp/params.yaml").grid()


def test_the_source_is_named(params):
    assert refusal(["train.eta=abc"], params, source="exp/params.yaml").startswith(
        "-S train.eta=abc (exp/params.yaml): "
    )


def test_apply_sets_fixed_and_point_on_a_copy(params):
    space = parse_space(["train.eta=0.1,0.03", "train.momentum=0.5", "+extra.note=sweep"], params)
    point = space.grid()[1]
    applied = space.apply(params, point)
    assert applied["train"]["eta"] == 0.03 and applied["train"]["momentum"] == 0.5
    assert applied["extra"] == {"note": "sweep"}
    assert params["train"]["eta"] == 0.03 and params["train"]["momentum"] == 0.0 and "extra" not in params
    applied["train"]["eta"] = 9
    assert space.apply(params, point)["train"]["eta"] == 0.03
    with pytest.raises(ConfigError, match="sets train.eta, not train.epochs"):
        space.apply(params, {"train.epochs": 3})


def test_point_key_is_a_stable_hash_of_fixed_and_point(params):
    one = parse_space(["train.eta=0.1,0.03", "train.epochs=3"], params)
    again = parse_space(["train.epochs=3", "train.eta=0.1,0.03"], params)
    other = parse_space(["train.eta=0.1,0.03", "train.epochs=4"], params)
    keys = [one.point_key(point) for point in one.grid()]
    assert len(set(keys)) == 2 and all(len(key) == 12 and int(key, 16) >= 0 for key in keys)
    assert keys == [again.point_key(point) for point in again.grid()]
    assert keys[0] == one.point_key(dict(reversed(list(one.grid()[0].items()))))
    assert set(keys).isdisjoint(other.point_key(point) for point in other.grid())


def test_describe_gives_overrides_that_parse_back_to_the_point(params):
    space = parse_space(["train.eta=0.1,0.03", f"train.architecture=shallow,{SIGMOID_NET}"], params)
    assert space.describe({"train.eta": 0.1, "train.epochs": 3}) == "train.eta=0.1 train.epochs=3"
    for point in space.grid():
        assert parse_space(space.describe(point).split(" "), params).fixed() == point


@pytest.fixture
def distributions():
    return pytest.importorskip("optuna").distributions


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.eta=0.1,0.03", ("CategoricalDistribution", {"choices": (0.1, 0.03)})),
        ("train.init=choice(book,corrected)", ("CategoricalDistribution", {"choices": ("book", "corrected")})),
        ("train.epochs=range(1,11)", ("IntDistribution", {"low": 1, "high": 10, "step": 1})),
        ("train.batch_size=range(10,41,10)", ("IntDistribution", {"low": 10, "high": 40, "step": 10})),
        ("train.epochs=range(10,0,-3)", ("IntDistribution", {"low": 1, "high": 10, "step": 3})),
        ("train.batch_size=tag(log,range(1,65))", ("IntDistribution", {"low": 1, "high": 64, "log": True})),
        ("train.lmbda=range(0.0,0.5,0.1)", ("FloatDistribution", {"low": 0.0, "high": 0.4, "step": 0.1})),
        ("train.eta=interval(0.01,0.1)", ("FloatDistribution", {"low": 0.01, "high": 0.1, "log": False})),
        ("train.eta=tag(log,interval(0.001,0.1))", ("FloatDistribution", {"low": 0.001, "high": 0.1, "log": True})),
    ],
)
def test_each_syntax_becomes_its_optuna_distribution(override, expected, params, distributions):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when it has to move a high end to fit the step
        (got,) = parse_space(["train.momentum=0.5", override], params).distributions().values()
    name, fields = expected
    assert type(got).__name__ == name
    assert {key: getattr(got, key) for key in fields} == fields


def test_an_optuna_range_holds_exactly_the_grid_values(params, distributions):
    space = parse_space(["train.lmbda=range(0.0,0.5,0.1)"], params)
    (dist,) = space.distributions().values()
    values = [point["train.lmbda"] for point in space.grid()]
    assert dist.low == min(values) and dist.high == pytest.approx(max(values))
    assert round((dist.high - dist.low) / dist.step) + 1 == len(values)


@pytest.mark.parametrize(
    "override, why",
    [
        (f"train.architecture=conv2_relu,{SIGMOID_NET}", "Optuna picks among numbers, strings, booleans and null"),
        ("train.eta=tag(log,choice(0.1,0.03))", "tag(log, ...) applies to range(...) and interval(...)"),
        ("train.lmbda=tag(log,range(0.0,0.3,0.1))", "Optuna: The parameter `step` is not supported"),
        ("train.lmbda=tag(log,interval(0,1))", "Optuna: "),
        ("train.epochs=int(interval(1,10))", "an integer interval: give range(a,b)"),
    ],
)
def test_what_optuna_cannot_sample_is_refused_in_one_line(override, why, params, distributions):
    with pytest.raises(ConfigError) as caught:
        parse_space([override], params).distributions()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"-S {override} (params.yaml): ") and why in message, message


def test_every_trial_optuna_asks_is_a_valid_training(params):
    optuna = pytest.importorskip("optuna")
    space = parse_space(
        ["train.eta=tag(log,interval(0.001,0.1))", "train.epochs=range(1,4)", "train.init=book,corrected"],
        params,
    )
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        trial = study.ask(space.distributions())
        config = from_section(TrainConfig, space.apply(params, trial.params), "train")
        assert 0.001 <= config.eta <= 0.1 and config.epochs in (1, 2, 3) and config.init in ("book", "corrected")


def test_without_optuna_the_grid_works_and_a_search_says_how_to_install_it(params, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    space = parse_space(["train.eta=0.1,0.03"], params)
    assert len(space.grid()) == 2
    with pytest.raises(PipelineError, match=r'install it with pip install -e "\.\[cluster\]"'):
        space.distributions()


def test_the_space_and_study_modules_import_optuna_only_when_asked():
    code = "import sys, pipeline.sweep.space, pipeline.sweep.study; print('optuna' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# +extra keys: no training reads them, so every point is the same training config, checked once;
# the edge is what is tested, not the config checks (train.seed=range(0,1000) takes 20 s)
@pytest.mark.parametrize("count", [1_000, 1_001])
def test_an_override_may_have_1000_values_and_not_one_more(count, params):
    override = f"+extra.n=range(0,{count})"
    if count == 1_000:
        (axis,) = parse_space([override], params).axes
        assert axis.values == tuple(range(1_000))  # every value, in order, none dropped at the limit
        return
    assert refusal([override], params) == (
        f"-S {override} (params.yaml): gives more than the 1,000 values a sweep's override may have: narrow it"
    )


@pytest.mark.parametrize(
    "overrides, size",
    [
        (["+extra.a=range(0,8)", "+extra.b=range(0,125)"], "8 x 125 = 1,000"),
        (["+extra.a=range(0,7)", "+extra.b=range(0,11)", "+extra.c=range(0,13)"], "7 x 11 x 13 = 1,001"),
    ],
    ids=["1000", "1001"],
)
def test_a_grid_may_have_1000_trainings_and_not_one_more(overrides, size, params):
    space = parse_space(overrides, params)
    if size.endswith("= 1,000"):
        points = space.grid()
        assert len(points) == 1_000 and len({tuple(point.values()) for point in points}) == 1_000
        assert (points[0], points[-1]) == ({"extra.a": 0, "extra.b": 0}, {"extra.a": 7, "extra.b": 124})
        return
    assert refusal(overrides, params) == (
        f"{' '.join(f'-S {o}' for o in overrides)} (params.yaml): a grid of {size} trainings, more than the "
        "1,000 a grid may have: narrow the values, or sample them with --search optuna --trials N"
    )
