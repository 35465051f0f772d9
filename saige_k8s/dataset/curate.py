"""The Arrow stage: candidates from the database become training examples.

Checks the database cannot make run here, after it has removed what its plain columns could
(``saige_k8s.experiences.query``): texts that are not UTF-8 (SQLite stores any bytes; BLOBs
and PostgreSQL ``bytea`` arrive as binary), texts blank once all whitespace is trimmed,
JSON nested too deep, then the ``buddhist_scores`` JSON; then rendering, deduplication and
the train/eval split. Everything is column-at-a-time; no per-row Python except the few rows
that fail a vectorised check (found by bisection) and scores that are not flat JSON objects.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import xxhash

from saige_k8s.dataset.formats import ChatFormat, prompt_prefix, text_columns, user_turn_columns
from saige_k8s.dataset.jsontext import JsonObject, too_deep, too_deep_mask
from saige_k8s.experiences.filters import Filters
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES, SCORE_RANGE

_NUMBER = r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?"
_MEMBER = rf'"[A-Za-z_][A-Za-z0-9_]*"[ \t]*:[ \t]*(?:{_NUMBER}|null)'
#: A flat JSON object of numbers on one line: read in bulk by Arrow's JSON reader.
FLAT_SCORES = rf"^[ \t]*\{{[ \t]*(?:{_MEMBER}(?:[ \t]*,[ \t]*{_MEMBER})*)?[ \t]*\}}[ \t]*$"
_SCORES_SCHEMA = pa.schema([(p, pa.float64()) for p in PRINCIPLES])
#: A JSON number (no leading zeros), as ``json.dumps`` writes a float or an int.
_JSON_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]{1,3})?"
#: The scores as ``json.dumps`` writes the five principles in order: most rows.
ORDERED_SCORES = r"^\{" + ", ".join(f'"{p}": {_JSON_NUMBER}' for p in PRINCIPLES) + r"\}$"
#: In ORDERED_SCORES, from each number's delimiter ('{' or the comma before it) to its first digit.
_ORDERED_KEY_LENGTHS = np.array([len(f'{{"{PRINCIPLES[0]}": ')] + [len(f', "{p}": ') for p in PRINCIPLES[1:]])
#: Flat rows the bulk reader rejects are narrowed down to runs this short, then parsed in Python.
_SLOW_RUN = 8

#: Text columns that are rendered or published: each value must be UTF-8 text.
TEXT_COLUMNS = ("id", "user_message", "context", "response", "difficulty")
#: Checks of this stage on texts, in order; ``empty_*`` continue the database's checks of the
#: same name (it catches NULL, '' and spaces; other whitespace is trimmed here).
TEXT_INVALID = (
    "missing_id",
    *(f"invalid_utf8_{c}" for c in TEXT_COLUMNS),
    "empty_user_message",
    "empty_response",
    "context_json_too_deep",
)
#: Checks of this stage on the scores JSON, in order, after TEXT_INVALID.
JSON_INVALID = ("malformed_scores_json", "missing_principle_score", "principle_out_of_range")
#: Every reason this stage counts; each row is counted under the first it fails.
STAGE_INVALID = (*TEXT_INVALID, *JSON_INVALID)

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGE_TYPE),
        ("text", pa.string()),
        ("format", pa.string()),
        ("actual_harm", pa.float64()),
        *((c, pa.float64()) for c in HARM_COMPONENTS),
        ("buddhist_weighted_score", pa.float64()),
        *((p, pa.float64()) for p in PRINCIPLES),
        ("buddhist_alignment", pa.string()),
        ("difficulty", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def string_offsets(text: pa.Array) -> np.ndarray:
    """A string column's value offsets into its data buffer, as numpy (no copy; the column may be a slice)."""
    if not len(text):  # an empty column may come without an offsets buffer
        return np.zeros(1, dtype=np.int32)
    return np.frombuffer(text.buffers()[1], dtype=np.int32, count=len(text) + 1, offset=4 * text.offset)


def parse_scores(scores: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values[n, 5] with NaN where a principle is missing or not a number, malformed[n]).

    ``scores`` must be a string column; invalid UTF-8 is the caller's to remove (``utf8_text``).
    """
    values, ordered = _read_ordered(scores)
    malformed = np.zeros(len(scores), dtype=bool)
    if not ordered.all():
        rest = ~ordered
        values[rest], malformed[rest] = _parse_any(scores.filter(pa.array(rest)) if ordered.any() else scores)
    # A score of -0 is 0: the JSON reader reads "-0" as -0.0, Python's json as 0, a cast as -0.0.
    values[values == 0] = 0.0
    return values, malformed


def _read_ordered(scores: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, read): the common case, the five principles in order as ``json.dumps`` writes
    them. A regular expression without captures (RE2's automaton, not its submatch engine)
    tells them; their numbers are then found by their delimiters and cast, at a third of the
    cost of extracting them by capture, a fifth of the JSON reader's."""
    values = np.full((len(scores), len(PRINCIPLES)), np.nan)
    matched = pc.fill_null(pc.match_substring_regex(scores, ORDERED_SCORES), False)
    read = np.asarray(matched.to_numpy(zero_copy_only=False), dtype=bool)
    if not read.any():
        return values, read
    try:  # a number beyond any double, for one: the general path judges the batch
        values[read] = _ordered_numbers(scores if read.all() else scores.filter(matched))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return values, np.zeros(len(scores), dtype=bool)
    values[np.isinf(values)] = np.nan  # as the JSON reader's: not a number here
    return values, read


def _ordered_numbers(scores: pa.Array) -> np.ndarray:
    """The numbers of scores that all match ORDERED_SCORES: gathered, one value each, then cast."""
    n, width = len(scores), len(PRINCIPLES)
    offsets = string_offsets(scores)
    data = np.frombuffer(scores.buffers()[2], dtype=np.uint8)[int(offsets[0]) : int(offsets[-1])]
    # Each value matched the pattern: four commas and the closing brace, and no other.
    ends = np.flatnonzero((data == ord(",")) | (data == ord("}"))).reshape(n, width)
    starts = np.empty_like(ends)
    starts[:, 0] = offsets[:-1] - offsets[0] + _ORDERED_KEY_LENGTHS[0]
    starts[:, 1:] = ends[:, :-1] + _ORDERED_KEY_LENGTHS[1:]
    lengths = (ends - starts).ravel()
    number_offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    number_offsets[1:] = np.cumsum(lengths)
    at = np.repeat(starts.ravel() - number_offsets[:-1], lengths) + np.arange(number_offsets[-1])
    numbers = pa.StringArray.from_buffers(lengths.size, pa.py_buffer(number_offsets), pa.py_buffer(data[at]))
    return numbers.cast(pa.float64()).to_numpy(zero_copy_only=False).reshape(n, width)


def _parse_any(scores: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``parse_scores`` for any JSON: flat objects in bulk, the rest one by one."""
    n = len(scores)
    values = np.full((n, len(PRINCIPLES)), np.nan)
    flat = pc.fill_null(pc.match_substring_regex(scores, FLAT_SCORES), False).to_numpy(zero_copy_only=False)
    slow = ~flat
    if flat.any():
        where = np.flatnonzero(flat)
        read, unread = _read_flat(pc.binary_join_element_wise(scores.filter(flat), "\n", ""))
        read[np.isinf(read)] = np.nan  # an integer beyond any double reads as inf: not a number here either
        values[where] = read
        slow[where[unread]] = True
    malformed = slow.copy()
    for i in np.flatnonzero(slow):
        parsed = _parse_one(scores[int(i)].as_py())
        if parsed is not None:
            malformed[i] = False
            values[i] = [parsed.get(p, math.nan) for p in PRINCIPLES]
    return values, malformed


def _read_flat(lines: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, unread): flat objects read in bulk by Arrow.

    One bad line (a principle given twice, a number too big for a double) fails Arrow's whole
    read; bisection isolates such lines in a few more bulk reads, and leaves short runs
    around them (``unread``) to the Python parser, which judges them one by one.
    """
    values = np.full((len(lines), len(PRINCIPLES)), np.nan)
    unread = np.zeros(len(lines), dtype=bool)
    pending = [(0, len(lines))]
    while pending:
        lo, hi = pending.pop()
        try:
            values[lo:hi] = _read_json_lines(lines.slice(lo, hi - lo))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if hi - lo <= _SLOW_RUN:
                unread[lo:hi] = True
            else:
                mid = (lo + hi) // 2
                pending += [(lo, mid), (mid, hi)]
    return values, unread


def _read_json_lines(lines: pa.Array) -> np.ndarray:
    payload = _concatenated(lines)
    table = pj.read_json(
        pa.BufferReader(payload),
        read_options=pj.ReadOptions(block_size=max(1 << 20, payload.size + 1)),
        parse_options=pj.ParseOptions(explicit_schema=_SCORES_SCHEMA, unexpected_field_behavior="ignore"),
    )
    if table.num_rows != len(lines):
        raise pa.ArrowInvalid("line count changed")
    return np.column_stack([table.column(p).to_numpy(zero_copy_only=False).astype(float) for p in PRINCIPLES])


def _concatenated(lines: pa.Array) -> pa.Buffer:
    """The bytes of a string array's values, back to back (no copy)."""
    offsets = string_offsets(lines)
    return lines.buffers()[2][int(offsets[0]) : int(offsets[-1])]


def _parse_one(text: str | None) -> dict[str, float] | None:
    """The slow path: any JSON object; principle values that are not finite numbers count as missing.

    Malformed (None): not an object, nested deeper than the limit, or a principle given twice
    (parsers disagree on which value wins).
    """
    if text is None or too_deep(text):
        return None
    try:
        parsed = json.loads(text, object_pairs_hook=JsonObject)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, JsonObject):
        return None
    named = [(k, v) for k, v in parsed if k in PRINCIPLES]
    if len({k for k, _ in named}) != len(named):
        return None
    return {k: number for k, v in named if (number := _finite(v)) is not None}


def _finite(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any double
        return None
    return number if math.isfinite(number) else None


@dataclass
class StageCounts:
    """What the Arrow stage removed, by reason (same names as the SQL stage uses)."""

    invalid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGE_INVALID, 0))
    removed: dict[str, int] = field(default_factory=dict)
    first_invalid: tuple[str, str] | None = None  # (reason, id), for --strict

    def count(
        self, checks: Iterable[tuple[str, np.ndarray]], ids: pa.Array, alive: np.ndarray, counted: np.ndarray | None
    ) -> np.ndarray:
        """Count each row still ``alive`` under the first check it fails; returns the rows that pass.

        ``counted``: the rows to count (None: all); the others are judged the same, uncounted.
        """
        alive = alive.copy()
        for reason, failing in checks:
            hit = alive & failing
            seen = hit if counted is None else hit & counted
            hits = int(seen.sum())
            self.invalid[reason] += hits
            if hits and self.first_invalid is None:
                self.first_invalid = (reason, _shown(ids, int(np.flatnonzero(seen)[0])))
            alive &= ~hit
        return alive

    def remove(self, name: str, hit: np.ndarray, counted: np.ndarray | None) -> None:
        """Count the rows a filter removed (of ``counted``, None: all)."""
        self.removed[name] = self.removed.get(name, 0) + int((hit if counted is None else hit & counted).sum())


def _shown(ids: pa.Array, i: int) -> str:
    """An id for a message, whatever its bytes."""
    if not _is_text(ids.type):
        return str(ids[i].as_py())
    large = pa.types.is_large_string(ids.type) or pa.types.is_large_binary(ids.type)
    raw = ids.slice(i, 1).view(pa.large_binary() if large else pa.binary())[0].as_py()
    return "NULL" if raw is None else raw.decode("utf-8", "backslashreplace")


def _is_text(kind: pa.DataType) -> bool:
    return any(
        check(kind)
        for check in (pa.types.is_string, pa.types.is_binary, pa.types.is_large_string, pa.types.is_large_binary)
    )


def utf8_text(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(``values`` as a string column with non-UTF-8 values nulled, mask of those values).

    Binary (BLOB, ``bytea``) holding UTF-8 is read as text, numbers as their text. One
    validation pass checks a whole batch; only a failing batch is bisected, and the
    values found are replaced by nulls, so no later kernel sees bad bytes.
    """
    bad = np.zeros(len(values), dtype=bool)
    if pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type):
        values = values.view(pa.large_binary()).cast(pa.binary())
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.string()), bad
    if not _is_text(values.type):
        return values.cast(pa.string()), bad
    text = values.view(pa.string()) if pa.types.is_binary(values.type) else values
    bad = _bisect(len(text), lambda lo, hi: _valid_utf8(text.slice(lo, hi - lo)))
    if bad.any():
        text = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), text)
    return text, bad


def trim_whitespace(text: pa.Array) -> pa.Array:
    """``utf8_trim_whitespace`` of a string column, or the column itself, uncopied, when no
    value can start or end with whitespace: whitespace is ASCII below ``!`` or starts or ends
    with a byte above 0x7f, and most texts begin and end with neither."""
    if text.type != pa.string():
        return pc.utf8_trim_whitespace(text)
    if text.null_count == len(text) or text.buffers()[2] is None:
        return text
    offsets = string_offsets(text)
    data = np.frombuffer(text.buffers()[2], dtype=np.uint8)
    nonempty = offsets[1:] > offsets[:-1]
    edges = np.concatenate([data[offsets[:-1][nonempty]], data[offsets[1:][nonempty] - 1]])
    if ((edges - np.uint8(ord("!"))) < np.uint8(0x80 - ord("!"))).all():  # each in [!, 0x7f]
        return text
    return pc.utf8_trim_whitespace(text)


def _valid_utf8(text: pa.Array) -> bool:
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _bisect(n: int, passes: Callable[[int, int], bool]) -> np.ndarray:
    """Rows that fail ``passes`` on their own: a passing batch costs one call, k bad rows O(k log n)."""
    bad = np.zeros(n, dtype=bool)
    pending = [(0, n)] if n else []
    while pending:
        lo, hi = pending.pop()
        if passes(lo, hi):
            continue
        if hi - lo == 1:
            bad[lo] = True
        else:
            mid = (lo + hi) // 2
            pending += [(lo, mid), (mid, hi)]
    return bad


class Judged(NamedTuple):
    """A batch as ``judge_rows`` leaves it."""

    batch: pa.RecordBatch
    #: Rows whose texts and scores are usable.
    usable: np.ndarray
    #: Usable rows that pass every filter.
    passes: np.ndarray

    def usable_rows(self) -> pa.RecordBatch:
        return self.batch if self.usable.all() else self.batch.filter(pa.array(self.usable))


def judge_rows(
    batch: pa.RecordBatch,
    filters: Filters,
    counts: StageCounts,
    counted: np.ndarray | None = None,
    alive: np.ndarray | None = None,
) -> Judged:
    """Every row of ``batch``, texts as UTF-8 and trimmed, with principle columns and the
    weighted score, and masks of the rows usable and of those that pass every filter.

    Preference data needs the rows a score filter removes, so those stay usable, marked.
    ``created_at`` that is not UTF-8 becomes NULL, as unparseable timestamps do; scores that
    are not UTF-8 become NULL and count as malformed. ``counted``: the rows ``counts`` counts
    (None: all); ``alive``: the rows to judge (None: all), the others unusable and uncounted.
    The unusable rows are masked, not dropped: a copy of a batch costs about as much as all
    the text checks together, and each consumer copies what it keeps anyway.
    """
    columns, alive = _judge_texts(batch, counts, counted, alive)
    values, malformed = parse_scores(columns["buddhist_scores"])
    missing = np.isnan(values).any(axis=1) & ~malformed
    with np.errstate(invalid="ignore"):
        out_of_range = ((values < SCORE_RANGE[0]) | (values > SCORE_RANGE[1])).any(axis=1) & ~malformed & ~missing
    weights = filters.weights()
    w = np.array([weights[p] for p in PRINCIPLES])
    computed = values @ (w / w.sum()) if len(values) else np.zeros(0)
    stored = columns["buddhist_weighted_score"].to_numpy(zero_copy_only=False).astype(float)
    weighted = np.where(np.isnan(stored), computed, stored)
    checks = zip(JSON_INVALID, (malformed, missing, out_of_range), strict=True)
    usable = counts.count(checks, batch.column("id"), alive, counted)
    passes = usable.copy()
    steps = [("min_buddhist", weighted < filters.min_buddhist)]
    steps += [(f"min_{p}", values[:, PRINCIPLES.index(p)] < v) for p, v in filters.principle_minima().items()]
    for name, failing in steps:
        hit = passes & failing
        counts.remove(name, hit, counted)
        passes &= ~hit
    columns["buddhist_weighted_score"] = pa.array(weighted)
    for k, p in enumerate(PRINCIPLES):
        columns[p] = pa.array(values[:, k])
    return Judged(pa.RecordBatch.from_pydict(columns), usable, passes)


def _judge_texts(
    batch: pa.RecordBatch, counts: StageCounts, counted: np.ndarray | None, alive: np.ndarray | None
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """(the columns, texts as UTF-8 and trimmed; the rows still alive once their texts are judged)."""
    columns = {name: batch.column(name) for name in batch.schema.names}
    checks = [("missing_id", pc.is_null(columns["id"]).to_numpy(zero_copy_only=False))]
    for name in TEXT_COLUMNS:
        if name == "id" and not _is_text(columns[name].type):
            continue  # integer ids
        columns[name], bad = utf8_text(columns[name])
        checks.append((f"invalid_utf8_{name}", bad))
    columns["buddhist_scores"], _ = utf8_text(columns["buddhist_scores"])
    if _is_text(columns["created_at"].type):
        columns["created_at"], _ = utf8_text(columns["created_at"])
    for name in ("user_message", "response"):
        columns[name] = trim_whitespace(columns[name])
        empty = pc.fill_null(pc.equal(pc.binary_length(columns[name]), 0), True)
        checks.append((f"empty_{name}", empty.to_numpy(zero_copy_only=False)))
    checks.append(("context_json_too_deep", _deep_json(columns["context"])))
    start = np.ones(len(batch), dtype=bool) if alive is None else alive
    return columns, counts.count(checks, batch.column("id"), start, counted)


def _deep_json(contexts: pa.Array) -> np.ndarray:
    """Contexts read as JSON (``describe_context``: they start with ``{``) and nested too deep."""
    deep = too_deep_mask(contexts)
    for i in np.flatnonzero(deep):
        deep[i] = contexts[int(i)].as_py().strip().startswith("{")
    return deep


class Examples(NamedTuple):
    """What ``as_examples`` made of a batch of judged candidates."""

    #: Unique rows of the dataset's Parquet schema.
    batch: pa.RecordBatch
    #: Their prompts' hashes, which decide the split: every answer to one prompt lands on one side.
    prompt_keys: np.ndarray
    duplicates: int
    #: Rows whose prompt is one of the evaluation suite's: never trained on.
    suite: int


#: The columns of a judged batch that examples are made of (the user turn comes rendered, in ``Prompts``).
EXAMPLE_SOURCES = (
    "id",
    "response",
    "actual_harm",
    *HARM_COMPONENTS,
    "buddhist_weighted_score",
    *PRINCIPLES,
    "buddhist_alignment",
    "difficulty",
    "created_at",
)


def as_examples(batch: pa.RecordBatch, fmt: ChatFormat, system: str, seen: SeenSet, prompts: Prompts) -> Examples:
    """Judged candidates (``judge_rows``) and their ``prompts`` -> examples, without the suite's prompts.

    Suite prompts and duplicates are dropped right after rendering, before the rest of the row
    is built; ``batch`` needs only the EXAMPLE_SOURCES columns (the fewer, the less each copy costs).
    """
    turn = prompts.turn
    text = text_columns(fmt, system, turn, batch.column("response"))
    keep = ~prompts.suite
    suite = len(batch) - int(keep.sum())
    # The suite's prompts are out before deduplication: they take no text's first occurrence.
    fresh = seen.first_occurrences(content_hashes(text.filter(pa.array(keep)) if suite else text))
    duplicates = len(fresh) - int(fresh.sum())
    keep[keep] = fresh
    prompt_keys = prompts.key
    if suite or duplicates:  # one copy for both
        mask = pa.array(keep)
        batch, turn, text = (c.filter(mask) for c in (batch, turn, text))
        prompt_keys = prompt_keys[keep]
    messages = conversations(fmt, system, turn, batch.column("response"))
    n = len(batch)
    columns = {
        "id": batch.column("id").cast(pa.string()),
        "messages": messages,
        "text": text,
        "format": pa.array([fmt.name] * n, pa.string()),
        **{c: batch.column(c) for c in ("actual_harm", *HARM_COMPONENTS, "buddhist_weighted_score", *PRINCIPLES)},
        "buddhist_alignment": batch.column("buddhist_alignment"),
        "difficulty": batch.column("difficulty"),
        "created_at": utc_timestamps(batch.column("created_at")),
    }
    return Examples(pa.RecordBatch.from_pydict(columns, schema=OUTPUT_SCHEMA), prompt_keys, duplicates, suite)


def conversations(fmt: ChatFormat, system: str, *turns: pa.Array) -> pa.ListArray:
    """Per row, the messages (system?, user, assistant, ...) whose contents are ``turns``: the ``messages`` column."""
    n = len(turns[0])
    has_system = fmt.system_open is not None and bool(system)
    roles = (["system"] if has_system else []) + ["user", "assistant", "user"][: len(turns)]
    per_row = len(roles)
    contents = [pa.array([system] * n, pa.string())] if has_system else []
    contents += list(turns)
    # Interleave per row: (system?, user, assistant) for row 0, then row 1, ...
    order = np.arange(n * per_row).reshape(per_row, n).T.reshape(-1) if n else np.zeros(0, dtype=np.int64)
    content = pa.concat_arrays([c.cast(pa.string()) for c in contents]).take(pa.array(order))
    return messages_of(roles, content, n)


def messages_of(roles: list[str], content: pa.Array, n: int) -> pa.ListArray:
    """``n`` lists of ``len(roles)`` messages each, ``content`` row-major."""
    per_row = len(roles)
    role = pa.array(np.tile(np.array(roles, dtype=object), n), pa.string())
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * per_row + 1, per_row, dtype=np.int32)),
        pa.StructArray.from_arrays([role, content], fields=list(MESSAGE_TYPE.value_type)),
    )


def utc_timestamps(values: pa.Array) -> pa.Array:
    """Database timestamps (native, or SQLite's ISO text, with or without offset) as UTC."""
    target = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(values.type):
        if values.type.tz is None:
            return pc.assume_timezone(values.cast(pa.timestamp("us")), "UTC")
        return values.cast(target)
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), target)
    text = values.cast(pa.string())
    try:
        return text.cast(target)
    except pa.ArrowInvalid:
        pass
    try:
        return pc.assume_timezone(text.cast(pa.timestamp("us")), "UTC")
    except pa.ArrowInvalid:
        pass
    import datetime as dt

    def one(value: str | None) -> dt.datetime | None:
        try:
            parsed = dt.datetime.fromisoformat(value) if value else None
        except ValueError:
            return None
        if parsed is not None and parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed

    return pa.array([one(v) for v in text.to_pylist()], target)


def content_hashes(text: pa.Array) -> np.ndarray:
    """64-bit hash of each row's text: the key for exact-duplicate removal."""
    offsets = string_offsets(text).tolist()
    data = memoryview(text.buffers()[2]) if text.buffers()[2] is not None else memoryview(b"")
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(data[a:b]) for a, b in itertools.pairwise(offsets)), dtype=np.uint64, count=len(text))


def eval_mask(keys: pa.Array | pa.ChunkedArray, eval_fraction: float) -> np.ndarray:
    """Deterministic split: a row is in eval when the hash of its key (text) falls below the fraction."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return in_eval(content_hashes(keys.cast(pa.string())), eval_fraction)


def in_eval(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
    """The split of ``eval_mask`` from precomputed xxh3 hashes (a prompt's: ``Prompts.key``)."""
    if eval_fraction <= 0:
        return np.zeros(len(hashes), dtype=bool)
    return hashes < np.uint64(int(eval_fraction * 2**64 - 1))


class Prompts(NamedTuple):
    """Each row's user turn and what its rendered prompt (the text up to the response) decides,
    worked out once per batch for the examples, the preference pairs and the KTO part alike."""

    turn: pa.Array
    #: xxh3 of the rendered prompt: the split's key (every answer to a prompt on one side) and the pairs'.
    key: np.ndarray
    #: The prompt is an evaluation suite scenario's: never trained on.
    suite: np.ndarray

    def filter(self, mask: np.ndarray) -> Prompts:
        return Prompts(self.turn.filter(pa.array(mask)), self.key[mask], self.suite[mask])


def prompts_of(batch: pa.RecordBatch, fmt: ChatFormat, system: str, excluded: pa.Array | None = None) -> Prompts:
    """The ``Prompts`` of judged rows (``judge_rows``: messages trimmed), usable or not (the
    consumers mask those that are not); ``excluded``: the suite's prompts."""
    turn = user_turn_columns(fmt, batch.column("user_message"), batch.column("context"))
    # Prompts recur (that is what pairs are made of): each distinct one is rendered and hashed once.
    distinct = pc.dictionary_encode(turn, null_encoding="encode")
    before, after = prompt_prefix(fmt, system)
    prompt = pc.binary_join_element_wise(before, distinct.dictionary, after, "")
    rows = distinct.indices.to_numpy()
    suite = np.zeros(len(batch), dtype=bool)
    if excluded is not None and len(excluded) and len(batch):
        suite = np.asarray(pc.is_in(prompt, value_set=excluded).to_numpy(zero_copy_only=False), dtype=bool)[rows]
    return Prompts(turn, content_hashes(prompt)[rows], suite)


class SeenSet:
    """Hashes seen so far, as sorted numpy runs merged like an LSM tree: 8 bytes per row."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def first_occurrences(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of rows whose hash is new (not seen before, first within ``hashes``)."""
        _, first = np.unique(hashes, return_index=True)
        fresh = np.zeros(len(hashes), dtype=bool)
        fresh[first] = True
        for run in self._runs:
            pos = np.searchsorted(run, hashes)
            pos[pos == len(run)] = 0
            fresh &= run[pos] != hashes if len(run) else True
        new = np.sort(hashes[fresh])
        self._runs.append(new)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]), kind="mergesort")
        return fresh
