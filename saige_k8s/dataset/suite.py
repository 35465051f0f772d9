"""The evaluation suite: prompts with a good and a bad reference answer, per principle and harm component.

A retrained candidate is compared with the champion by how much more likely each finds a
scenario's good answer than its bad one, so the suite ships with the code (``suite.yaml``,
versioned with it); a deployment can add its own scenarios in files of the same format.
Extraction renders the same prompts to keep them out of training.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from saige_k8s.dataset.formats import ChatFormat, render
from saige_k8s.errors import ConfigError
from saige_k8s.experiences.filters import NotBool
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES
from saige_k8s.yamlfile import parse_yaml, read_yaml, validate_document

TARGETS: Final = (*PRINCIPLES, *HARM_COMPONENTS)
#: Fewer than this many scenarios make a per-target comparison a coin toss.
MIN_PER_TARGET: Final = 2
SHIPPED_ORIGIN: Final = "saige_k8s/dataset/suite.yaml"

_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    # Strict: a number where a text belongs is a mistake in the file, not something to convert.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Scenario(_Strict):
    id: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    target: str
    user: str
    context: dict[str, str] | None = None
    good: str
    bad: str

    @field_validator("user", "good", "bad")
    @classmethod
    def _text(cls, value: str) -> str:
        """Stripped: a YAML block scalar's trailing newline would otherwise be scored as part of the text."""
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(f"expected one of {', '.join(TARGETS)}")
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and any(not key.strip() or not item.strip() for key, item in value.items()):
            raise ValueError("keys and values must not be empty")
        return value

    def context_text(self) -> str | None:
        """The context as the experiences table's column holds it (JSON text), so it is described the same way."""
        return None if self.context is None else json.dumps(self.context, ensure_ascii=False)

    def prompt(self, fmt: ChatFormat, system_prompt: str) -> str:
        return render(fmt, system_prompt, self.user, self.context_text(), "")[0]


class _SuiteFile(_Strict):
    """One file's scenarios: a user's file need not cover every target, the whole suite must."""

    version: Annotated[Literal[1], NotBool]
    scenarios: list[Scenario]

    @field_validator("scenarios")
    @classmethod
    def _unique_ids(cls, value: list[Scenario]) -> list[Scenario]:
        if not value:
            raise ValueError("expected at least one scenario")
        first: dict[str, int] = {}
        for index, scenario in enumerate(value):
            if scenario.id in first:
                raise PydanticCustomError(
                    "duplicate_id",
                    "duplicate id {id} (first at scenarios[{first}])",
                    {"id": repr(scenario.id), "first": first[scenario.id], "loc": (index, "id")},
                )
            first[scenario.id] = index
        return value


class Suite(_SuiteFile):
    @field_validator("scenarios")
    @classmethod
    def _every_target(cls, value: list[Scenario]) -> list[Scenario]:
        counts = Counter(scenario.target for scenario in value)
        thin = [f"{target} ({counts[target]})" for target in TARGETS if counts[target] < MIN_PER_TARGET]
        if thin:
            raise ValueError(f"each target needs at least {MIN_PER_TARGET} scenarios; too few: {', '.join(thin)}")
        return value

    def prompts(self, format: ChatFormat, system_prompt: str) -> set[str]:
        """Every scenario's rendered prompt: what extraction leaves out of training."""
        return {scenario.prompt(format, system_prompt) for scenario in self.scenarios}


def load_suite(extra: Sequence[Path] = ()) -> Suite:
    """The shipped suite, then each file of ``extra`` appended; an id may appear only once in all of them."""
    text = resources.files(__package__).joinpath("suite.yaml").read_text(encoding="utf-8")
    documents = [(SHIPPED_ORIGIN, parse_yaml(text, SHIPPED_ORIGIN))]
    documents += [(str(path), read_yaml(Path(path), "suite file")) for path in extra]
    scenarios: list[Scenario] = []
    origin_of: dict[str, str] = {}
    for origin, data in documents:
        part = validate_document(_SuiteFile, data, origin)
        for index, scenario in enumerate(part.scenarios):
            if scenario.id in origin_of:
                where = f"{origin}: scenarios[{index}].id"
                raise ConfigError(f"{where}: duplicate id {scenario.id!r} (already in {origin_of[scenario.id]})")
            origin_of[scenario.id] = origin
        scenarios.extend(part.scenarios)
    return validate_document(Suite, {"version": 1, "scenarios": scenarios}, SHIPPED_ORIGIN)
