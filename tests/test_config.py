import pytest
from pydantic import ValidationError

from raysel.config import RunConfig, load_config, parse_config
from raysel.errors import ConfigError
from raysel.scorers import SCORERS
from raysel.select import POLICIES

MINIMAL = {"input": {"path": "c.jsonl"}, "output": {"path": "out"}, "select": {"budget": 0.25}}


def test_minimal_config_fills_defaults():
    cfg = parse_config(MINIMAL)
    assert [s.name for s in cfg.scorers] == ["entropy", "loss"]
    assert cfg.select.policy == "stratified" and cfg.select.score == "entropy"
    assert cfg.embed.model == "minilm" and cfg.cluster.k == 64


def test_scorer_names_become_scorer_configs():
    cfg = parse_config(
        {
            **MINIMAL,
            "scorers": ["loss", {"name": "entropy", "max_tokens": 32}],
            "select": {"budget": 10, "score": "loss"},
        }
    )
    assert cfg.scorers[0].name == "loss" and cfg.scorers[1].max_tokens == 32
    assert cfg.select.budget == 10


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"select": {"budget": 0}}, "select.budget: a row-count budget must be >= 1"),
        ({"select": {"budget": 1.5}}, "select.budget: a fractional budget must be in (0, 1]"),
        ({"select": {"budget": 0.1, "policy": "nope"}}, "select.policy: unknown policy 'nope'"),
        ({"scorers": ["perplexity-typo"]}, "scorers.0.name: unknown scorer 'perplexity-typo'"),
        (
            {"scorers": [{"name": "loss", "batch_size": 0}], "select": {"budget": 0.1, "score": "loss"}},
            "scorers.0.batch_size: Input should be greater than 0",
        ),
        ({"select": {"budget": 0.1, "score": "loss"}, "scorers": ["entropy"]}, "'loss' is not computed"),
        ({"select": {"budget": 0.1, "policy": "threshold"}}, "the `threshold` policy needs a threshold"),
        ({"embed": {"resources": {"cpus": 0, "gpus": 0}}}, "embed.resources"),
        ({"embed": {"device": "cuda"}}, "device: cuda needs `resources.gpus` > 0"),
        ({"cluster": {"k": 4, "typo": 1}}, "cluster.typo: Extra inputs are not permitted"),
        ({"select": {"budget": 0.1, "params": {"nope": 1}}}, "params.nope: Extra inputs are not permitted"),
        (
            {"scorers": ["el2n"], "select": {"budget": 0.1, "score": "el2n"}},
            "scorers[0] (el2n): trains on labels; set input.label_field",
        ),
    ],
)
def test_errors_name_the_field(patch, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch})
    assert message in str(err.value)


def test_actors_is_a_fixed_pool_size_or_an_elastic_range(tmp_path):
    cfg = parse_config(
        {
            **MINIMAL,
            "embed": {"actors": 3},
            "scorers": [{"name": "entropy", "actors": {"min": 1, "max": 64}}, "loss"],
        }
    )
    assert cfg.embed.actors == 3 and cfg.embed.pool_size == (3, 3)  # the fixed form stays an int
    assert cfg.scorers[0].pool_size == (1, 64) and cfg.scorers[1].pool_size == (1, 1)
    assert parse_config(cfg.model_dump()).scorers[0].pool_size == (1, 64)  # the manifest's dump reads back
    path = tmp_path / "run.yaml"
    path.write_text(
        "input: {path: c.jsonl}\noutput: {path: out}\nscorers: [{name: entropy, actors: 2}]\nselect: {budget: 0.25}\n"
    )
    assert load_config(path, ["scorers.0.actors={min: 2, max: 8}"]).scorers[0].pool_size == (2, 8)


@pytest.mark.parametrize(
    ("actors", "message"),
    [
        (0, "embed.actors: a pool needs at least one actor, got 0"),
        (True, "embed.actors: must be a pool size N >= 1 (`actors: 4`) or an elastic pool {min: M, max: N}"),
        ("4", "embed.actors: must be a pool size N >= 1"),
        ({"min": 0, "max": 4}, "embed.actors: min must be >= 1 (a pool starts with at least one actor), got 0"),
        ({"min": 8, "max": 4}, "embed.actors: min (8) must be <= max (4)"),
        ({"max": 4}, "embed.actors: an elastic pool is {min: M, max: N} with two integers, got {'max': 4}"),
        ({"min": 1, "max": 4, "initial": 2}, "an elastic pool is {min: M, max: N} with two integers"),
        ({"min": 1, "max": 2.5}, "an elastic pool is {min: M, max: N} with two integers"),
    ],
)
def test_a_bad_actors_value_gets_one_line_naming_both_forms(actors, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, "embed": {"actors": actors}})
    assert message in str(err.value)
    assert str(err.value).count("\n") == 1  # "invalid config:" and one line, not one per union member


def test_an_elastic_range_built_in_python_is_checked_too():
    from raysel.config import ActorRange

    with pytest.raises(ValidationError, match=r"min \(3\) must be <= max \(2\)"):
        ActorRange(min=3, max=2)


def test_random_policy_needs_no_score():
    cfg = parse_config({**MINIMAL, "scorers": [], "select": {"budget": 0.5, "policy": "random", "score": None}})
    assert cfg.scorers == []


def test_load_config_applies_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("input: {path: c.jsonl}\noutput: {path: out}\nscorers: [entropy]\nselect: {budget: 0.25}\n")
    cfg = load_config(path, ["select.budget=100", "select.order=asc", "cluster.k=8", "scorers.0.max_tokens=16"])
    assert (cfg.select.budget, cfg.select.order, cfg.cluster.k, cfg.scorers[0].max_tokens) == (100, "asc", 8, 16)


def test_load_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("input: {path: c.jsonl}\noutput: {path: out}\nselect: {budget: 0.25}\n")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(ok, ["select.budget"])


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.select = None  # type: ignore[misc]
    assert isinstance(cfg, RunConfig)


def test_registries_match_documented_names():
    """The names users write in YAML; docs/architecture.md lists the same ones."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    for name in list(SCORERS) + list(POLICIES):
        assert f"`{name}`" in doc, f"{name} is registered but not documented in docs/architecture.md"
