"""PipelineSpec: shipped specs load, presets resolve, errors name the bad key, flags win."""

from __future__ import annotations

from pathlib import Path

import pytest

from saige_k8s.errors import ConfigError
from saige_k8s.experiences.filters import PRESETS, Filters
from saige_k8s.spec import load_spec, parse_spec

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))


def test_jobs_exist() -> None:
    assert JOBS, "no jobs/*.yaml shipped"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    spec.extract.filters.resolve()  # thresholds are valid too


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_follow_the_seed_phases(preset: str) -> None:
    filters = parse_spec({"extract": {"filters": {"preset": preset}}}).extract.filters.resolve()
    expected = {
        "permissive": (0.4, 5.0, "moderate"),
        "default": (0.3, 6.0, "good"),
        "strict": (0.25, 6.5, "good"),
        "elite": (0.2, 7.5, "excellent"),
    }[preset]
    assert (filters.max_harm, filters.min_buddhist, filters.min_alignment) == expected


def test_defaults_are_the_seeds() -> None:
    filters = parse_spec({}).extract.filters.resolve()
    assert filters == Filters()
    assert (filters.max_harm, filters.min_buddhist, filters.min_alignment, filters.limit) == (0.3, 6.0, "good", None)


def test_spec_values_override_preset_and_flags_override_spec() -> None:
    spec = parse_spec({"extract": {"filters": {"preset": "elite", "max_harm": 0.1, "min_ahimsa": 7}}})
    assert spec.extract.filters.resolve().max_harm == 0.1
    assert spec.extract.filters.resolve().min_buddhist == 7.5
    flagged = spec.extract.filters.resolve(max_harm=0.15, preset="permissive", min_buddhist=None)
    assert (flagged.max_harm, flagged.min_buddhist, flagged.min_ahimsa) == (0.15, 5.0, 7)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"extract": {"filters": {"max_harm": 1.2}}}, "extract.filters.max_harm"),
        ({"extract": {"format": "chatml"}}, "extract.format"),
        ({"extract": {"eval_fraction": 1}}, "extract.eval_fraction"),
        ({"source": {"tabel": "x"}}, "source.tabel: unknown key"),
        ({"name": "Bad Name!"}, "name"),
        ({"extract": {"filters": {"principle_weights": {"metta": 1}}}}, "metta"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_errors_name_the_path(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match="spec") as info:
        spec = parse_spec(data, "spec")
        spec.extract.filters.resolve()
    assert message in str(info.value)


def test_principle_weights_shift_the_computed_score() -> None:
    weights = {"ahimsa": 3, "sacca": 1, "karuna": 1, "panna": 1, "upekkha": 0}
    filters = parse_spec({"extract": {"filters": {"principle_weights": weights}}}).extract.filters.resolve()
    assert filters.weights() == {"ahimsa": 3.0, "sacca": 1.0, "karuna": 1.0, "panna": 1.0, "upekkha": 0.0}
