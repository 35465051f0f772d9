"""The SAIGE experiences table: logical column names, score ranges and labels.

Every other module speaks in these logical names; a deployment whose table uses other
names maps them once, in the spec's ``source.columns``.
"""

from __future__ import annotations

from typing import Final

HARM_COMPONENTS: Final = ("deception", "harshness", "omission", "manipulation")
PRINCIPLES: Final = ("ahimsa", "sacca", "karuna", "panna", "upekkha")

#: Best first. ``min_alignment: good`` keeps ``good`` and everything before it.
ALIGNMENT_LEVELS: Final = ("excellent", "good", "moderate", "poor", "harmful")
DIFFICULTIES: Final = ("easy", "medium", "hard")

HARM_RANGE: Final = (0.0, 1.0)
SCORE_RANGE: Final = (0.0, 10.0)

#: Logical column name -> default physical name. Order is the order columns are selected.
COLUMNS: Final = (
    "id",
    "created_at",
    "user_message",
    "context",
    "response",
    "model",
    "difficulty",
    *HARM_COMPONENTS,
    "actual_harm",
    "buddhist_scores",
    "buddhist_weighted_score",
    "buddhist_alignment",
)

#: Columns an extraction cannot work without; the others may be absent from a real table.
REQUIRED_COLUMNS: Final = (
    "id",
    "user_message",
    "response",
    "actual_harm",
    "buddhist_scores",
    "buddhist_alignment",
)


def alignments_at_least(level: str) -> tuple[str, ...]:
    """Labels at ``level`` or better, e.g. ``good`` -> ``("excellent", "good")``."""
    return ALIGNMENT_LEVELS[: ALIGNMENT_LEVELS.index(level) + 1]
