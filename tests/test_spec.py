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


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("extract:\n  filters:\n    max_harm: 0.1\n    max_harm: 0.9\n", "max_harm", 4),
        ("name: a\ntrain: {epochs: 1}\nname: b\n", "name", 3),
        ("extract: {filters: {preset: strict, preset: elite}}\n", "preset", 1),
    ],
)
def test_a_duplicate_key_is_an_error_naming_key_and_line(tmp_path: Path, text: str, key: str, line: int) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert f"duplicate key '{key}' at line {line}" in str(info.value) and str(path) in str(info.value)


def test_yaml_merge_keys_still_override(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("train:\n  <<: {epochs: 1, batch_size: 2}\n  epochs: 2\n")
    assert (load_spec(path).train.epochs, load_spec(path).train.batch_size) == (2, 2)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"extract": {"filters": {"max_harm": True}}}, "extract.filters.max_harm"),
        ({"extract": {"filters": {"min_buddhist": True}}}, "extract.filters.min_buddhist"),
        ({"extract": {"filters": {"max_deception": False}}}, "extract.filters.max_deception"),
        ({"extract": {"filters": {"limit": True}}}, "extract.filters.limit"),
        ({"extract": {"filters": {"principle_weights": {"ahimsa": True}}}}, "extract.filters.principle_weights"),
        ({"extract": {"eval_fraction": False}}, "extract.eval_fraction"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"kubernetes": {"train": {"backoff_limit": True}}}, "kubernetes.train.backoff_limit"),
    ],
)
def test_numbers_refuse_booleans(data: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(data, "spec")
    assert f"spec: {where}: " in str(info.value) and "boolean" in str(info.value)
    with pytest.raises(ValueError, match="boolean"):
        Filters(max_harm=True)


def test_whole_numbers_are_still_numbers() -> None:
    spec = parse_spec({"extract": {"filters": {"max_harm": 0, "min_buddhist": 7, "limit": 5}}, "train": {"epochs": 2}})
    filters = spec.extract.filters.resolve()
    assert (filters.max_harm, filters.min_buddhist, filters.limit, spec.train.epochs) == (0.0, 7.0, 5, 2.0)


# The API server's quantity grammar (apimachinery's resource.ParseQuantity and its test table).
VALID_QUANTITIES = ["0", "2", "500m", "8Gi", "1.5Gi", "1e3", "1E3", "+1", "+1.5e-3", "250u", "100n", "1.", ".5"]
VALID_QUANTITIES += ["5E", "3Ei", "1k", "1Ki", "7T", "2Pi", "10M"]
INVALID_QUANTITIES = ["", " 1", "1 ", "1.1.M", "1+1.0M", "0.1mi", "0.1am", "aoeu", ".5i", "1i", "1K", "1ki", "1e"]
INVALID_QUANTITIES += ["e3", ".", "+", "1_000", "Infinity", "NaN", "1e1.5", "8GB", "-1", "-500m"]


@pytest.mark.parametrize("quantity", VALID_QUANTITIES)
def test_every_kubernetes_quantity_is_accepted(quantity: str) -> None:
    from kubernetes.utils import parse_quantity

    parse_quantity(quantity)  # the official client reads it too
    pod = {"resources": {"limits": {"memory": quantity}}, "shm_size": quantity}
    spec = parse_spec({"kubernetes": {"train": pod}})
    assert spec.kubernetes.train.resources.limits["memory"] == quantity
    assert spec.kubernetes.train.shm_size == quantity


@pytest.mark.parametrize("quantity", INVALID_QUANTITIES)
def test_what_is_not_a_quantity_is_refused_by_name(quantity: str) -> None:
    with pytest.raises(ConfigError, match=r"kubernetes\.extract\.resources\.requests\.cpu.*not a Kubernetes quantity"):
        parse_spec({"kubernetes": {"extract": {"resources": {"requests": {"cpu": quantity}}}}})


def test_numbers_are_quantities_too() -> None:
    spec = parse_spec({"kubernetes": {"train": {"resources": {"requests": {"cpu": 4, "memory": 0.5}}}}})
    assert spec.kubernetes.train.resources.requests == {"cpu": "4", "memory": "0.5"}
