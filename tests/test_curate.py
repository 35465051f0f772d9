"""The Arrow stage's building blocks: score parsing, dedup memory, split, timestamps."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saige_k8s.dataset.curate import SeenSet, _parse_one, eval_mask, parse_scores, trim_whitespace, utc_timestamps
from saige_k8s.experiences.schema import PRINCIPLES

FULL = '{"ahimsa": 7.2, "sacca": 8, "karuna": 6.5, "panna": 9.1, "upekkha": 7}'


@pytest.mark.parametrize(
    ("text", "values", "malformed"),
    [
        (FULL, [7.2, 8, 6.5, 9.1, 7], False),
        ('{"upekkha":7,"panna":9.1,"karuna":6.5,"sacca":8,"ahimsa":7.2}', [7.2, 8, 6.5, 9.1, 7], False),  # order
        ('  {"ahimsa": 1e0, "sacca": 2, "karuna": 3, "panna": 4, "upekkha": 5, "extra": 99}  ', [1, 2, 3, 4, 5], False),
        ('{"ahimsa": 7, "sacca": 8}', [7, 8, math.nan, math.nan, math.nan], False),  # missing -> NaN
        ('{"ahimsa": "7", "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7}', [math.nan, 8, 6, 9, 7], False),
        (
            '{"ahimsa": 7, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7, "notes": {"a": 1}}',
            [7, 8, 6, 9, 7],
            False,
        ),  # nested: the slow path
        ('{\n "ahimsa": 7, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7\n}', [7, 8, 6, 9, 7], False),
        ('{"ahimsa": true, "sacca": 8, "karuna": 6, "panna": 9, "upekkha": 7}', [math.nan, 8, 6, 9, 7], False),
        ('{"ahimsa": 7.2, "sacca": 8', [math.nan] * 5, True),
        ("[1, 2, 3]", [math.nan] * 5, True),
        ("", [math.nan] * 5, True),
        (None, [math.nan] * 5, True),
    ],
)
def test_parse_scores(text: str | None, values: list[float], malformed: bool) -> None:
    # Surround the case with well-formed rows: the bulk path and the slow path must line up.
    column = pa.array([FULL, text, FULL], pa.string())
    parsed, bad = parse_scores(column)
    np.testing.assert_allclose(parsed[1], values)
    assert bad.tolist() == [False, malformed, False]
    np.testing.assert_allclose(parsed[0], [7.2, 8, 6.5, 9.1, 7])
    np.testing.assert_allclose(parsed[2], [7.2, 8, 6.5, 9.1, 7])


_NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from(["01", "-0", "-0.0", "-0e0", "0e0", "-0.0e-5", "1E5", "1e-400", "1e999", "-1e999"]),
    st.sampled_from(["1.", ".5", "+1", "0x10", "1_0", "7 ", "NaN", "Infinity", "null", '"7"']),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_NUMBERS, min_size=5, max_size=5), min_size=1, max_size=30))
def test_the_ordered_scores_read_as_any_json_reads_them(rows: list[list[object]]) -> None:
    """Most rows are ``json.dumps`` of the five principles in order, read by a regular
    expression and a cast, the rest by Arrow's JSON reader or Python's: every path must give
    what Python's ``json`` gives the row alone, number for number (-0 is 0)."""

    def member(principle: str, value: object) -> str:
        return f'"{principle}": {value if isinstance(value, str) else json.dumps(value)}'

    texts = ["{" + ", ".join(member(p, v) for p, v in zip(PRINCIPLES, row, strict=True)) + "}" for row in rows]
    # A slice, as a batch's column may be: the values' offsets do not start at zero.
    values, malformed = parse_scores(pa.array(["{}", *texts, FULL], pa.string()).slice(1, len(texts)))
    for text, got, bad in zip(texts, values, malformed, strict=True):
        alone = _parse_one(text)
        assert bad == (alone is None), text
        expected = np.array([math.nan] * 5 if alone is None else [alone.get(p, math.nan) for p in PRINCIPLES]) + 0.0
        np.testing.assert_array_equal(got, expected, err_msg=text)
        assert np.signbit(got).tolist() == np.signbit(expected).tolist(), text


_EDGES = st.sampled_from(
    [" ", "\t", "\n", "\x1c", "\x7f", "\u00a0", "\u0085", "\u2003", "\u3000", "é", "\U0001f600", "!", "a", "~"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(_EDGES, max_size=3), st.text(max_size=8)), max_size=12), st.integers(0, 3))
def test_trimming_skips_only_columns_that_need_none(texts: list[str | None], skip: int) -> None:
    """Trimming returns the column uncopied only when no value starts or ends with what
    could be whitespace; either way the values are Arrow's trim, and Python's strip."""
    column = pa.array(["  pad  "] * skip + texts, pa.string()).slice(skip)
    trimmed = trim_whitespace(column)
    assert trimmed.to_pylist() == pc.utf8_trim_whitespace(column).to_pylist()
    assert trimmed.to_pylist() == [None if t is None else t.strip() for t in texts]


def test_seen_set_keeps_first_occurrence_across_batches() -> None:
    seen = SeenSet()
    rng = np.random.default_rng(0)
    universe = rng.integers(0, 2**63, size=500, dtype=np.int64).astype(np.uint64)
    reference: set[int] = set()
    for _ in range(60):
        batch = rng.choice(universe, size=40)
        fresh = seen.first_occurrences(batch)
        expected = []
        for h in batch.tolist():
            expected.append(h not in reference)
            reference.add(h)
        assert fresh.tolist() == expected
    assert len(seen._runs) <= 12  # merged, not one run per batch


def test_eval_split_is_a_pure_function_of_id() -> None:
    ids = pa.array([str(i) for i in range(20_000)])
    mask = eval_mask(ids, 0.1)
    assert 0.09 < mask.mean() < 0.11
    shuffled = pa.array(list(reversed(ids.to_pylist())))
    assert eval_mask(shuffled, 0.1).tolist() == list(reversed(mask.tolist()))
    assert not eval_mask(ids, 0.0).any()
    assert (eval_mask(ids, 0.2) | ~mask).all()  # a larger fraction only adds rows


@pytest.mark.parametrize(
    "values",
    [
        pa.array(["2026-03-01 10:00:00+00:00", "2026-03-01T10:00:00Z", None]),
        pa.array(["2026-03-01 10:00:00", "2026-03-01 10:00:00", None]),
        pa.array(["2026-03-01 11:00:00+01:00", "2026-03-01T10:00:00.000000", None]),
        pa.array([dt.datetime(2026, 3, 1, 10), dt.datetime(2026, 3, 1, 10), None], pa.timestamp("us")),
    ],
)
def test_timestamps_become_utc(values: pa.Array) -> None:
    out = utc_timestamps(values)
    assert out.type == pa.timestamp("us", tz="UTC")
    expected = dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)
    assert out.to_pylist() == [expected, expected, None]


def test_unparseable_timestamps_become_null() -> None:
    assert utc_timestamps(pa.array(["yesterday", "2026-03-01"])).to_pylist() == [
        None,
        dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
    ]
