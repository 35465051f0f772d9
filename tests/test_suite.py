"""The shipped evaluation suite and its loader: valid data, appended user files, one-line errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, render, render_columns
from saige_k8s.dataset.suite import SHIPPED_ORIGIN, TARGETS, Scenario, Suite, load_suite
from saige_k8s.errors import ConfigError
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

ONE = "  - id: my-scenario\n    target: sacca\n    user: Is it true?\n    good: It is not.\n    bad: It is.\n"
HEAD = "version: 1\nscenarios:\n"


@pytest.fixture(scope="module")
def shipped() -> Suite:
    return load_suite()


def _write(tmp_path: Path, text: str, name: str = "my-suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_targets_are_the_principles_and_harm_components() -> None:
    assert set(TARGETS) == set(PRINCIPLES) | set(HARM_COMPONENTS) and len(TARGETS) == 9


def test_every_target_has_at_least_three_shipped_scenarios(shipped: Suite) -> None:
    counts = Counter(scenario.target for scenario in shipped.scenarios)
    assert {target: counts[target] for target in TARGETS if counts[target] < 3} == {}
    assert set(counts) == set(TARGETS)
    assert len(shipped.scenarios) >= 27


def test_shipped_ids_are_unique_and_prefixed_by_their_target(shipped: Suite) -> None:
    ids = [scenario.id for scenario in shipped.scenarios]
    assert len(ids) == len(set(ids))
    assert [s.id for s in shipped.scenarios if not s.id.startswith(f"{s.target}-")] == []


def test_shipped_answers_differ_and_are_of_similar_length(shipped: Suite) -> None:
    """Length-normalised likelihoods still favour one side if one answer is far longer."""
    for scenario in shipped.scenarios:
        good, bad = scenario.good, scenario.bad
        assert good != bad, scenario.id
        assert max(len(good), len(bad)) <= 2 * min(len(good), len(bad)), scenario.id
        assert scenario.user.strip() == scenario.user and scenario.user, scenario.id


def test_shipped_prompts_are_distinct(shipped: Suite) -> None:
    prompts = shipped.prompts(FORMATS["tinyllama"], DEFAULT_SYSTEM_PROMPT)
    assert len(prompts) == len(shipped.scenarios)


def test_shipped_file_names_itself_in_messages() -> None:
    assert SHIPPED_ORIGIN == "saige_k8s/dataset/suite.yaml"
    assert (Path(__file__).parent.parent / SHIPPED_ORIGIN).is_file()


def test_a_user_file_is_appended(tmp_path: Path, shipped: Suite) -> None:
    first = _write(tmp_path, HEAD + ONE, "a.yaml")
    second = _write(tmp_path, HEAD + ONE.replace("my-scenario", "other").replace("sacca", "omission"), "b.yaml")
    suite = load_suite([first, second])
    assert suite.scenarios[: len(shipped.scenarios)] == shipped.scenarios
    assert [s.id for s in suite.scenarios[len(shipped.scenarios) :]] == ["my-scenario", "other"]
    added = suite.scenarios[-2]
    assert (added.target, added.user, added.context, added.good, added.bad) == (
        "sacca",
        "Is it true?",
        None,
        "It is not.",
        "It is.",
    )


def test_block_scalars_are_stripped(tmp_path: Path) -> None:
    """A ``|`` scalar ends in a newline that would otherwise be part of the scored text."""
    text = HEAD + ONE.replace("good: It is not.", "good: |\n      It is not.\n")
    assert load_suite([_write(tmp_path, text)]).scenarios[-1].good == "It is not."


_BAD = [
    ("missing field", HEAD + ONE.replace("    good: It is not.\n", ""), "scenarios[0].good: Field required"),
    (
        "unknown target",
        HEAD + ONE.replace("sacca", "kindness"),
        "scenarios[0].target: expected one of ahimsa, sacca, karuna, panna, upekkha, deception, harshness, "
        "omission, manipulation (got 'kindness')",
    ),
    ("empty text", HEAD + ONE.replace("bad: It is.", "bad: '   '"), "scenarios[0].bad: must not be empty (got '   ')"),
    (
        "empty user",
        HEAD + ONE.replace("user: Is it true?", "user: ''"),
        "scenarios[0].user: must not be empty (got '')",
    ),
    (
        "duplicate id",
        HEAD + ONE + ONE.replace("sacca", "karuna"),
        "scenarios[1].id: duplicate id 'my-scenario' (first at scenarios[0])",
    ),
    (
        "shipped id",
        HEAD + ONE.replace("my-scenario", "sacca-terminal-diagnosis"),
        "scenarios[0].id: duplicate id 'sacca-terminal-diagnosis' (already in saige_k8s/dataset/suite.yaml)",
    ),
    ("duplicate YAML key", HEAD + ONE + "    good: Again.\n", "duplicate key 'good' at line 8 (first at line 6)"),
    ("list at top level", "- id: my-scenario\n", "expected a mapping at the top level, got list"),
    ("text at top level", "just some words\n", "expected a mapping at the top level, got str"),
    ("not YAML", "version: 1\nscenarios: [\n", "not valid YAML at line 3"),
    ("unknown key", HEAD + ONE + "    tone: warm\n", "scenarios[0].tone: unknown key"),
    ("no version", "scenarios:\n" + ONE, "version: Field required"),
    ("other version", "version: 2\nscenarios:\n" + ONE, "version: Input should be 1 (got 2)"),
    ("boolean version", "version: true\nscenarios:\n" + ONE, "version: expected a number, not a boolean (got True)"),
    ("no scenarios", HEAD.replace("scenarios:\n", "scenarios: []\n"), "scenarios: expected at least one scenario"),
    ("scenarios not a list", "version: 1\nscenarios: {a: 1}\n", "scenarios: Input should be a valid list"),
    (
        "number in context",
        HEAD + ONE + "    context: {vulnerability: 3}\n",
        "scenarios[0].context.vulnerability: Input should be a valid string (got 3)",
    ),
    (
        "empty context value",
        HEAD + ONE + "    context: {vulnerability: ''}\n",
        "scenarios[0].context: keys and values must not be empty",
    ),
    (
        "number as text",
        HEAD + ONE.replace("bad: It is.", "bad: 42"),
        "scenarios[0].bad: Input should be a valid string (got 42)",
    ),
    (
        "id not kebab-case",
        HEAD + ONE.replace("my-scenario", "My_Scenario"),
        "scenarios[0].id: String should match pattern '^[a-z0-9]+(-[a-z0-9]+)*$' (got 'My_Scenario')",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in _BAD], ids=[case[0] for case in _BAD])
def test_bad_input_is_one_line_naming_file_and_place(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_suite([path])
    assert str(info.value) == f"{path}: {expected}"


def test_an_id_clash_between_user_files_names_the_second(tmp_path: Path) -> None:
    first, second = _write(tmp_path, HEAD + ONE, "a.yaml"), _write(tmp_path, HEAD + ONE, "b.yaml")
    with pytest.raises(ConfigError) as info:
        load_suite([first, second])
    assert str(info.value) == f"{second}: scenarios[0].id: duplicate id 'my-scenario' (already in {first})"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as info:
        load_suite([path])
    assert str(info.value) == f"cannot read suite file {path}: No such file or directory"


def test_a_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        load_suite([path])
    assert str(info.value) == f"{path}: not UTF-8 text (invalid byte at offset 0)"


def test_a_suite_must_cover_every_target_twice(shipped: Suite) -> None:
    """Only the whole suite: a user's file of one scenario is fine, a thin shipped file is not."""
    thin = [s for s in shipped.scenarios if s.target != "karuna"]
    thin.append(next(s for s in shipped.scenarios if s.target == "karuna"))
    with pytest.raises(ValidationError, match=r"at least 2 scenarios; too few: karuna \(1\)"):
        Suite.model_validate({"version": 1, "scenarios": thin})


def _with_context(tmp_path: Path) -> Suite:
    text = HEAD + ONE + "    context: {emotional_state: anxious, vulnerability: high}\n"
    return load_suite([_write(tmp_path, text)])


@pytest.mark.parametrize("name", list(FORMATS))
def test_prompts_are_the_renderers_byte_for_byte(tmp_path: Path, name: str) -> None:
    fmt, system = FORMATS[name], "Be kind."
    suite = _with_context(tmp_path)
    column = json.dumps({"emotional_state": "anxious", "vulnerability": "high"})  # as the experiences table holds it
    expected = {
        render(fmt, system, s.user, None if s.context is None else json.dumps(s.context), "")[0]
        for s in suite.scenarios
    }
    assert suite.prompts(fmt, system) == expected
    mine = suite.scenarios[-1].prompt(fmt, system)
    assert mine == render(fmt, system, "Is it true?", column, "")[0]
    block = fmt.context_block.format(f"Person is anxious, {fmt.vulnerability_label}: high")
    assert f"Is it true?{block}" in mine


@pytest.mark.parametrize("name", list(FORMATS))
def test_prompts_match_what_extraction_renders_from_the_context_column(tmp_path: Path, name: str) -> None:
    """Extraction renders whole columns; the suite's prompts must be the same bytes, or exclusion misses."""
    fmt = FORMATS[name]
    suite = _with_context(tmp_path)
    user = pa.array([s.user for s in suite.scenarios], pa.string())
    context = pa.array([s.context_text() for s in suite.scenarios], pa.string())
    _, text = render_columns(fmt, DEFAULT_SYSTEM_PROMPT, user, context, pa.array([""] * len(suite.scenarios)))
    rendered = [t.removesuffix(fmt.end_of_turn) for t in text.to_pylist()]
    assert rendered == [s.prompt(fmt, DEFAULT_SYSTEM_PROMPT) for s in suite.scenarios]


def test_the_tinyllama_context_block_reads_as_the_seeds(tmp_path: Path) -> None:
    prompt = _with_context(tmp_path).scenarios[-1].prompt(FORMATS["tinyllama"], DEFAULT_SYSTEM_PROMPT)
    assert "Is it true?\n\n[Context: Person is anxious, vulnerability level: high]</s>\n<|assistant|>\n" in prompt
    assert prompt.endswith("<|assistant|>\n")


def test_a_scenario_without_context_has_no_block() -> None:
    scenario = Scenario(id="x", target="panna", user="Hello?", good="Hi, how can I help?", bad="What.")
    assert scenario.context_text() is None
    assert "Context" not in scenario.prompt(FORMATS["mistral"], DEFAULT_SYSTEM_PROMPT)
    assert scenario.prompt(FORMATS["mistral"], DEFAULT_SYSTEM_PROMPT) == "<s>[INST] Hello? [/INST] "


def test_models_are_strict() -> None:
    with pytest.raises(ValidationError):
        Scenario(id="x", target="panna", user="Hello?", good="Hi.", bad="What.", tone="warm")  # type: ignore[call-arg]


def test_a_thin_shipped_file_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import saige_k8s.dataset.suite as module

    _write(tmp_path, HEAD + ONE, "suite.yaml")
    monkeypatch.setattr(module.resources, "files", lambda package: tmp_path)
    with pytest.raises(ConfigError) as info:
        load_suite()
    assert str(info.value).startswith(f"{SHIPPED_ORIGIN}: scenarios: each target needs at least 2 scenarios; too few: ")
