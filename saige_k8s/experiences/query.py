"""Filters as SQL: the database judges every row on its plain columns, in one CASE expression.

One statement reads the table once and returns every row's ``verdict`` with its columns:
the funnel counts the verdicts, candidates become examples, and the rows a filter removed
feed the preference pairs, so the funnel and the extracted rows cannot disagree. Checks
that need the ``buddhist_scores`` JSON, or that no SQL every database runs could make
cheaply (UTF-8 validity, whitespace other than spaces), run afterwards, in Arrow
(``saige_k8s.dataset.curate``): every database can run this SQL, and JSON parsing there
would cost more than the whole scan. Identifiers come from the reflected table and are
quoted by SQLAlchemy; thresholds are bound parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import ColumnElement

from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.schema import (
    ALIGNMENT_LEVELS,
    COLUMNS,
    HARM_COMPONENTS,
    HARM_RANGE,
    SCORE_RANGE,
    alignments_at_least,
)

if TYPE_CHECKING:  # numpy arrives with the rows; the query is built before, and --help builds none
    import numpy as np

CANDIDATE = "candidate"
#: The row query's column beside ROW_COLUMNS: the verdict (an index into ``Judgement.labels``)
#: plus the flags below, one value per row where three columns cost ADBC a third more per row.
VERDICT = "verdict"
#: Flags of the VERDICT column: the table's harm / weighted score is a number in its range
#: (the funnel's statistics of the whole table add these up).
HARM_IN_RANGE = 32
WEIGHTED_IN_RANGE = 64
_CODE = HARM_IN_RANGE - 1

#: Columns of the row query, in order, by logical name.
ROW_COLUMNS = (
    "id",
    "created_at",
    "user_message",
    "context",
    "response",
    "difficulty",
    "actual_harm",
    *HARM_COMPONENTS,
    "buddhist_weighted_score",
    "buddhist_scores",
    "buddhist_alignment",
)


@dataclass(frozen=True)
class Judgement:
    """The SQL pieces an extraction needs, built once per (table, filters)."""

    columns: dict[str, ColumnElement]
    alignment: ColumnElement
    #: Verdict names, ``invalid:<reason>`` / ``filter:<name>`` in check order, CANDIDATE last.
    labels: tuple[str, ...]
    #: Index into ``labels`` of the first check a row fails (integers compare cheaply).
    verdict: ColumnElement
    #: A cheap test true only of rows some check removes (never of a candidate): a filter on
    #: the harm or the stored weighted score, or a check before those.
    surely_removed: ColumnElement[bool]

    @property
    def candidate(self) -> int:
        return len(self.labels) - 1

    @property
    def first_valid(self) -> int:
        """The lowest verdict of a row the database finds usable (a filter's, or the candidates')."""
        return sum(label.startswith("invalid:") for label in self.labels)


def judge(table: sa.Table, mapping: dict[str, str | None], filters: Filters) -> Judgement:
    """``mapping``: logical column -> physical column of ``table`` (None: the table lacks it)."""
    col: dict[str, ColumnElement] = {
        name: (table.c[physical] if physical is not None else sa.null()) for name, physical in mapping.items()
    }
    for name in COLUMNS:
        col.setdefault(name, sa.null())
    harm = col["actual_harm"]
    stored_weighted = col["buddhist_weighted_score"]
    raw_alignment = col["buddhist_alignment"]
    # Labels are compared trimmed and lower-cased; most already are, so skip the string work.
    normalized = sa.func.lower(sa.func.trim(raw_alignment))
    canonical = raw_alignment.in_(ALIGNMENT_LEVELS)
    alignment = sa.case((canonical, raw_alignment), else_=normalized)
    kept_labels = alignments_at_least(filters.min_alignment)
    # The label checks below test the stored label first, and the normalized one only if it
    # is not canonical: one list lookup per row where the CASE above, tested, would cost three.
    unknown_alignment = sa.case(
        (canonical, sa.false()), (normalized.in_(ALIGNMENT_LEVELS), sa.false()), else_=sa.true()
    )
    below_min_alignment = sa.case((canonical, raw_alignment.not_in(kept_labels)), else_=normalized.not_in(kept_labels))

    def blank(c: ColumnElement) -> ColumnElement[bool]:
        # The cheap cases only: NULL, '' and spaces. The Arrow stage trims all whitespace and
        # counts what is left blank under the same reason. trim() copies the whole text; only
        # texts that start with a space can trim to ''.
        if isinstance(c.type, sa.LargeBinary):  # bytea/BLOB columns: text functions do not apply
            return sa.or_(c.is_(None), sa.func.length(c) == 0)
        return sa.or_(c.is_(None), c == "", sa.and_(c.like(" %"), sa.func.trim(c) == ""))

    def outside(c: ColumnElement, bounds: tuple[float, float]) -> ColumnElement[bool]:
        return sa.or_(c < bounds[0], c > bounds[1])

    invalid = [
        ("empty_user_message", blank(col["user_message"])),
        ("empty_response", blank(col["response"])),
        ("missing_harm", harm.is_(None)),
        ("harm_out_of_range", outside(harm, HARM_RANGE)),
        ("component_out_of_range", sa.or_(*(outside(col[c], HARM_RANGE) for c in HARM_COMPONENTS))),
        ("unknown_alignment", unknown_alignment),
        ("weighted_score_out_of_range", outside(stored_weighted, SCORE_RANGE)),
    ]
    too_harmful = harm >= filters.max_harm
    # A NULL stored score is computed from the JSON and judged in the Arrow stage.
    too_low = stored_weighted < filters.min_buddhist
    rejected = [
        ("max_harm", too_harmful),
        *((f"max_{c}", col[c] >= v) for c, v in filters.component_maxima().items()),
        ("min_alignment", below_min_alignment),
        ("min_buddhist", too_low),
    ]
    checks = [(f"invalid:{reason}", cond) for reason, cond in invalid] + [
        (f"filter:{name}", cond) for name, cond in rejected
    ]
    verdict = sa.case(*((cond, code) for code, (_, cond) in enumerate(checks)), else_=len(checks))
    labels = (*(label for label, _ in checks), CANDIDATE)
    assert len(labels) <= _CODE, "the verdict's code would overlap its flags"
    return Judgement(col, alignment, labels, verdict, sa.or_(too_harmful, too_low))


def verdict_codes(values: np.ndarray) -> np.ndarray:
    """The VERDICT column's index into ``Judgement.labels``, flags removed."""
    return values & _CODE


def rows_query(
    j: Judgement, id_is_integer: bool, where: ColumnElement[bool] | None = None, brief_removed: bool = False
) -> sa.Select:
    """Every row once, in id order: its verdict, what the funnel's statistics add up, its columns.

    One statement serves the funnel (the verdict of every row, and the source statistics)
    and the rows (candidates for the examples; with preference pairs, the rows a filter
    removed as well). Measured on SQLite at 1M rows, a second statement for the funnel cost
    more CPU than the candidates' own read, while returning every row's columns costs less
    than hiding the unneeded ones behind ``CASE verdict ...`` (which needs the verdict in a
    subquery). Numbers are cast so that a column is one Arrow type even where SQLite mixes
    integer and real storage; text columns need no cast (casting would copy every response).
    The flags of ``VERDICT`` (``HARM_IN_RANGE``, ``WEIGHTED_IN_RANGE``) say where a row's
    number is one in its range: only then is its cast column the number stored, for SQLite
    may store text in a rejected row's number column (a text compares above every number).
    ``where``: only these rows (``rows_of``: the preference pairs' rows, read again for their texts).
    ``brief_removed``: ``brief_response`` for the rows a filter surely removes.
    """
    harm = j.columns["actual_harm"]
    weighted = j.columns["buddhist_weighted_score"]
    real = sa.Float
    kinds = {
        "id": sa.BigInteger if id_is_integer else sa.Text,
        "actual_harm": real,
        "buddhist_weighted_score": real,
        **dict.fromkeys(HARM_COMPONENTS, real),
    }
    exprs: dict[str, ColumnElement] = {}
    for name in ROW_COLUMNS:
        expr = j.alignment if name == "buddhist_alignment" else j.columns[name]
        exprs[name] = sa.cast(expr, kinds[name]) if name in kinds else expr
    if brief_removed:
        exprs["response"] = brief_response(j)

    def flag(value: ColumnElement, bounds: tuple[float, float], bit: int) -> ColumnElement:
        return sa.case((sa.and_(value >= bounds[0], value <= bounds[1]), bit), else_=0)

    verdict = j.verdict + flag(harm, HARM_RANGE, HARM_IN_RANGE) + flag(weighted, SCORE_RANGE, WEIGHTED_IN_RANGE)
    statement = sa.select(*(exprs[n].label(n) for n in ROW_COLUMNS), verdict.label(VERDICT)).order_by(j.columns["id"])
    return statement if where is None else statement.where(where)


def brief_response(j: Judgement) -> ColumnElement:
    """The response, or its first character where the row is surely removed and that character is
    printable ASCII: the Arrow stage judges the two alike (valid, not blank once trimmed).

    Without preference data that uses them (the KTO part), removed rows' responses are only
    checked, never written: the pairs read their rows again. On the 1M-row benchmark table this
    leaves out a third of the bytes read (half the responses'), and the read's CPU falls by a
    sixth on each side (README, Performance). Only for text the database guarantees to be
    UTF-8 (PostgreSQL read as UTF-8): a first character cannot vouch for bytes SQLite did not
    check. ``ascii`` is PostgreSQL's (the first character's code point; whitespace is at most
    32 or above 127).
    """
    response = j.columns["response"]
    printable = sa.func.ascii(response).between(33, 127)
    return sa.case((sa.and_(j.surely_removed, printable), sa.func.substr(response, 1, 1)), else_=response)


#: Ids per statement where they are bound one value each (under every database's limit on bound values).
IDS_PER_STATEMENT = 900


def rows_of(j: Judgement, ids: Sequence[object], dialect: str, id_is_integer: bool) -> list[ColumnElement[bool]]:
    """Conditions that select the rows of ``ids``, one per statement, as few as the database allows.

    Bound one value each, ids need a statement per IDS_PER_STATEMENT, and the ADBC SQLite
    driver spends about 70 µs on each. SQLite takes them all as one JSON array (``json_each``);
    PostgreSQL integer ids as one array (the index still serves ``= ANY``). Other ids (text,
    UUID: an array would need the column's own type) and other databases, in parts.
    """
    column = j.columns["id"]
    values = list(ids)
    if dialect == "sqlite":
        listed = sa.func.json_each(sa.bindparam("ids", json.dumps(values), type_=sa.Text)).table_valued("value")
        return [column.in_(sa.select(listed.c.value))]
    if dialect == "postgresql" and id_is_integer:
        return [column == sa.any_(sa.bindparam("ids", values, type_=postgresql.ARRAY(sa.BigInteger)))]
    return [column.in_(values[i : i + IDS_PER_STATEMENT]) for i in range(0, len(values), IDS_PER_STATEMENT)]
