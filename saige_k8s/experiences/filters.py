"""Quality filters: thresholds, presets, and the order rows are judged in."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

Alignment = Literal["excellent", "good", "moderate", "poor", "harmful"]
PresetName = Literal["permissive", "default", "strict", "elite"]


def refuse_bool(value: object) -> object:
    """YAML's ``true`` is not a threshold, though pydantic would read it as 1."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


#: A number that is not a boolean (ints pass: ``max_harm: 0`` is a threshold).
NotBool = BeforeValidator(refuse_bool)
Harm = Annotated[float, Field(ge=0.0, le=1.0), NotBool]
Score = Annotated[float, Field(ge=0.0, le=10.0), NotBool]

#: The seed's phases: bootstrap with permissive data, tighten as the model improves.
PRESETS: Final[dict[str, dict[str, float | str]]] = {
    "permissive": {"max_harm": 0.4, "min_buddhist": 5.0, "min_alignment": "moderate"},
    "default": {"max_harm": 0.3, "min_buddhist": 6.0, "min_alignment": "good"},
    "strict": {"max_harm": 0.25, "min_buddhist": 6.5, "min_alignment": "good"},
    "elite": {"max_harm": 0.2, "min_buddhist": 7.5, "min_alignment": "excellent"},
}

#: Reasons a row cannot be used at all: those the database judges, in the order they are
#: checked, then those judged on the candidates (the ``empty_*`` checks continue there for
#: whitespace other than spaces).
INVALID_REASONS: Final = (
    "empty_user_message",
    "empty_response",
    "missing_harm",
    "harm_out_of_range",
    "component_out_of_range",
    "unknown_alignment",
    "weighted_score_out_of_range",
    "missing_id",
    "invalid_utf8_id",
    "invalid_utf8_user_message",
    "invalid_utf8_context",
    "invalid_utf8_response",
    "invalid_utf8_difficulty",
    "context_json_too_deep",
    "malformed_scores_json",
    "missing_principle_score",
    "principle_out_of_range",
)


class Filters(BaseModel):
    """What counts as a high-quality experience. Unset optional thresholds do not filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_harm: Harm = Field(0.3, description="Keep actual_harm < this (0-1).")
    min_buddhist: Score = Field(6.0, description="Keep the weighted Buddhist score >= this (0-10).")
    min_alignment: Alignment = Field("good", description="Keep this alignment and better.")
    limit: Annotated[int, Field(gt=0), NotBool] | None = Field(
        None, description="At most this many examples (in id order)."
    )
    max_deception: Harm | None = Field(None, description="Keep deception < this (NULL passes).")
    max_harshness: Harm | None = Field(None, description="Keep harshness < this (NULL passes).")
    max_omission: Harm | None = Field(None, description="Keep omission < this (NULL passes).")
    max_manipulation: Harm | None = Field(None, description="Keep manipulation < this (NULL passes).")
    min_ahimsa: Score | None = Field(None, description="Keep ahimsa >= this (0-10).")
    min_sacca: Score | None = Field(None, description="Keep sacca >= this (0-10).")
    min_karuna: Score | None = Field(None, description="Keep karuna >= this (0-10).")
    min_panna: Score | None = Field(None, description="Keep panna >= this (0-10).")
    min_upekkha: Score | None = Field(None, description="Keep upekkha >= this (0-10).")
    #: Weights for computing the weighted score where the table's value is NULL.
    principle_weights: dict[str, Annotated[float, Field(ge=0.0), NotBool]] = Field(
        default_factory=lambda: dict.fromkeys(PRINCIPLES, 1.0)
    )

    @model_validator(mode="after")
    def _weights_name_principles(self) -> Filters:
        unknown = sorted(set(self.principle_weights) - set(PRINCIPLES))
        if unknown:
            raise ValueError(f"unknown principle(s) {unknown}; expected some of {list(PRINCIPLES)}")
        if sum(self.principle_weights.values()) <= 0:
            raise ValueError("principle_weights must not all be zero")
        return self

    @classmethod
    def from_preset(cls, preset: PresetName = "default", **overrides: object) -> Filters:
        """A preset with some thresholds replaced; ``None`` overrides are ignored."""
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls.model_validate(values)

    def component_maxima(self) -> dict[str, float]:
        return {c: v for c in HARM_COMPONENTS if (v := getattr(self, f"max_{c}")) is not None}

    def principle_minima(self) -> dict[str, float]:
        return {p: v for p in PRINCIPLES if (v := getattr(self, f"min_{p}")) is not None}

    def weights(self) -> dict[str, float]:
        """Weight per principle; principles left out of ``principle_weights`` weigh 0."""
        return {p: float(self.principle_weights.get(p, 0.0)) for p in PRINCIPLES}

    def filter_names(self) -> tuple[str, ...]:
        """The funnel's filter steps in the order rows are judged (cheapest first)."""
        return (
            "max_harm",
            *(f"max_{c}" for c in self.component_maxima()),
            "min_alignment",
            "min_buddhist",
            *(f"min_{p}" for p in self.principle_minima()),
        )

    def relax_hint(self, removed: dict[str, int]) -> str:
        """Which filter removed most rows, said as the flag that relaxes it."""
        suite = removed.get("suite_prompt", 0)
        removed = {k: n for k, n in removed.items() if k in self.filter_names()}  # suite_prompt has no flag
        if not removed or max(removed.values()) == 0:
            if suite:
                return f"the {suite} candidate(s) left all ask an evaluation suite prompt, never trained on"
            return "no filter removed rows; the table holds no usable experiences"
        worst = max(removed, key=lambda k: removed[k])
        flag = "--" + worst.replace("_", "-")
        current = getattr(self, worst)
        return (
            f"filter {worst} removed the most rows ({removed[worst]}): relax it, e.g. {flag} (now {current}), "
            "or start from --preset permissive (0.4/5.0/moderate)"
        )
