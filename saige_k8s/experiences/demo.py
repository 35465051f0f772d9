"""A synthetic SAIGE experience database with realistic distributions.

The demo, the tests and the benchmarks all run on it. Deterministic per seed: the same
``rows`` and ``seed`` always produce the same table, whatever the database.

What it models: an alignment mix skewed towards good answers, harm and virtue that move
together (better-aligned answers are less harmful and score higher on every principle),
responses from a few words to a few KB, JSON and free-text contexts, NULL harm components
and NULL weighted scores (to be computed from the principles), exact duplicates, prompts asked
again (SAIGE re-asks its scenarios: a new answer of its own quality to an earlier row's
message and context, which gives the dataset its preference pairs), and a
small share of rows that cannot be used (each kind of defect the extractor must count).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from saige_k8s import lifecycle
from saige_k8s.experiences import is_sqlite_path
from saige_k8s.experiences.schema import ALIGNMENT_LEVELS, DIFFICULTIES, HARM_COMPONENTS, PRINCIPLES
from saige_k8s.temporaries import SIDE_FILES, hold_lock, remove_stale_temporaries

ALIGNMENT_SHARES = (0.18, 0.32, 0.24, 0.16, 0.10)
_VIRTUE_MEAN = np.array([8.4, 7.1, 5.6, 4.0, 2.4])
_HARM_MEAN = np.array([0.07, 0.14, 0.30, 0.50, 0.74])

DEFECTS = (
    "empty_response",
    "missing_harm",
    "harm_out_of_range",
    "malformed_scores_json",
    "principle_out_of_range",
    "unknown_alignment",
)

_TOPICS = (
    "anxiety",
    "my job",
    "a breakup",
    "grief",
    "money worries",
    "loneliness",
    "my exams",
    "a conflict with my sister",
    "burnout",
    "sleeping badly",
    "a difficult decision",
    "my health",
    "anger at a friend",
    "moving to a new city",
    "feeling stuck",
)
_ASKS = (
    "I'm struggling with {t}. What should I do?",
    "How do I deal with {t}?",
    "Can you help me think through {t}?",
    "I keep worrying about {t}. Is that normal?",
    "What would you say to someone dealing with {t}?",
    "Be honest: am I overreacting about {t}?",
)
_SENTENCES = (
    "I understand how difficult this can be, and you're not alone in feeling this way.",
    "It might help to notice what tends to come right before these feelings.",
    "Would you like to talk through what has been weighing on you most?",
    "Small steps matter: a short walk, a glass of water, a few slow breaths.",
    "Be gentle with yourself; change rarely happens all at once.",
    "If things feel overwhelming, reaching out to someone you trust can really help.",
    "A professional counsellor could offer support tailored to your situation.",
    "There is no single right answer here, but there are kinder and wiser ones.",
    "Honesty with yourself about what you need is a good place to start.",
    "You could try writing down what you can control and what you cannot.",
    "It is worth asking what a good friend would say to you right now.",
    "Whatever you decide, you deserve patience and care while you work it out.",
    "Just get over it.",
    "That's not really my problem to solve.",
)
_STATES = ("anxious", "sad", "angry", "calm", "confused", "hopeful", "overwhelmed")
_VULNERABILITY = ("low", "medium", "high")
_FREE_CONTEXTS = (
    "User has mentioned a recent loss.",
    "Follow-up to an earlier conversation about work stress.",
    "Person is a student preparing for exams.",
    "Late-night conversation; the person seems tired.",
)
_MODELS = ("tinyllama-1.1b-chat", "mistral-7b-instruct", "llama-3-8b-instruct")


@dataclass(frozen=True)
class DemoOptions:
    rows: int = 1000
    seed: int = 0
    #: Share of rows carrying one defect from DEFECTS.
    defect_share: float = 0.02
    #: Share of rows that exactly repeat an earlier row's message, context and response.
    duplicate_share: float = 0.02
    #: Share of rows that ask an earlier row's message and context again, answered anew.
    reask_share: float = 0.3
    #: Median response length in bytes; lengths are log-normal (a few words to a few KB).
    response_median_bytes: int = 420
    start: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def experiences_table(metadata: sa.MetaData, name: str = "experiences") -> sa.Table:
    """The default SAIGE schema."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_message", sa.Text, nullable=False),
        sa.Column("context", sa.Text),
        sa.Column("response", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("difficulty", sa.Text),
        *(sa.Column(c, sa.Float) for c in HARM_COMPONENTS),
        sa.Column("actual_harm", sa.Float),
        sa.Column("buddhist_scores", sa.Text),
        sa.Column("buddhist_weighted_score", sa.Float),
        sa.Column("buddhist_alignment", sa.Text),
    )


def _corpus(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A long text of shuffled sentences, and the offsets where its sentences start."""
    picks = rng.integers(0, len(_SENTENCES), size=size // 60 + 1)
    sentences = [_SENTENCES[i] for i in picks]
    starts = np.cumsum([0] + [len(s) + 1 for s in sentences[:-1]])
    return " ".join(sentences), starts


def generate(options: DemoOptions, batch_rows: int = 50_000) -> Iterator[list[tuple]]:
    """Yield the table's rows in batches of tuples, in the column order of experiences_table."""
    rng = np.random.default_rng(options.seed)
    corpus, sentence_starts = _corpus(rng, 1 << 20)
    sentence_starts = sentence_starts[sentence_starts < len(corpus) - 7000]
    produced: list[tuple[str, str | None, str]] = []  # a pool of earlier rows to duplicate
    # Re-asks draw from their own stream, so every other column is what it was without them.
    reasks = np.random.default_rng([options.seed, 1])
    for first in range(0, options.rows, batch_rows):
        n = min(batch_rows, options.rows - first)
        reask = np.where(reasks.random(n) < options.reask_share, reasks.integers(0, 1 << 30, n), -1)
        yield _batch(rng, corpus, sentence_starts, first, n, options, produced, reask)


def _batch(  # noqa: PLR0915 - one recipe, top to bottom
    rng: np.random.Generator,
    corpus: str,
    sentence_starts: np.ndarray,
    first: int,
    n: int,
    options: DemoOptions,
    pool: list[tuple[str, str | None, str]],
    reask: np.ndarray,
) -> list[tuple]:
    level = rng.choice(len(ALIGNMENT_LEVELS), size=n, p=ALIGNMENT_SHARES)
    virtue = np.clip(_VIRTUE_MEAN[level] + rng.normal(0, 0.9, n), 0, 10)
    principles = np.clip(virtue[:, None] + rng.normal(0, 0.7, (n, len(PRINCIPLES))), 0, 10).round(2)
    weighted = principles.mean(axis=1).round(3)
    weighted_null = rng.random(n) < 0.1
    harm = np.clip(_HARM_MEAN[level] + rng.normal(0, 0.09, n), 0, 1).round(3)
    components = np.clip(harm[:, None] + rng.normal(0, 0.05, (n, 4)), 0, 1).round(3)
    component_null = rng.random((n, 4)) < 0.1

    lengths = np.clip(rng.lognormal(np.log(options.response_median_bytes), 0.8, n), 12, 6000).astype(int)
    starts = sentence_starts[rng.integers(0, len(sentence_starts), n)]
    ask = rng.integers(0, len(_ASKS), n)
    topic = rng.integers(0, len(_TOPICS), n)
    context_kind = rng.choice(3, size=n, p=(0.5, 0.25, 0.25))
    state = rng.integers(0, len(_STATES), n)
    vulnerability = rng.integers(0, len(_VULNERABILITY), n)
    free_context = rng.integers(0, len(_FREE_CONTEXTS), n)
    difficulty = rng.integers(0, len(DIFFICULTIES) + 1, n)
    model = rng.integers(0, len(_MODELS) + 1, n)
    seconds = rng.integers(0, 300 * 86400, n)
    duplicate = rng.random(n) < options.duplicate_share
    defect = np.where(rng.random(n) < options.defect_share, rng.integers(0, len(DEFECTS), n), -1)

    rows = []
    for i in range(n):
        user = _ASKS[ask[i]].format(t=_TOPICS[topic[i]])
        if context_kind[i] == 0:
            context = json.dumps(
                {"emotional_state": _STATES[state[i]], "vulnerability": _VULNERABILITY[vulnerability[i]]}
            )
        elif context_kind[i] == 1:
            context = _FREE_CONTEXTS[free_context[i]]
        else:
            context = None
        start = starts[i]
        end = corpus.rfind(" ", start, start + lengths[i])  # whole words, from a sentence start
        text = corpus[start : end if end > start else start + lengths[i]]
        if duplicate[i] and pool:
            user, context, text = pool[int(rng.integers(0, len(pool)))]
        else:
            user, context = _remember(pool, user, context, text, int(reask[i]))
        response: str | None = text
        scores = dict(zip(PRINCIPLES, principles[i].tolist(), strict=True))
        scores_json = json.dumps(scores)
        row_harm: float | None = float(harm[i])
        label = ALIGNMENT_LEVELS[level[i]]
        match DEFECTS[defect[i]] if defect[i] >= 0 else None:
            case "empty_response":
                response = "" if i % 2 else None
            case "missing_harm":
                row_harm = None
            case "harm_out_of_range":
                row_harm = 1.7 if i % 2 else -0.2
            case "malformed_scores_json":
                scores_json = scores_json[: len(scores_json) // 2]
            case "principle_out_of_range":
                scores_json = json.dumps({**scores, "karuna": 11.5})
            case "unknown_alignment":
                label = "great"
        rows.append(
            (
                first + i + 1,
                options.start + dt.timedelta(seconds=int(seconds[i])),
                user,
                context,
                response,
                _MODELS[model[i] - 1] if model[i] else None,
                DIFFICULTIES[difficulty[i] - 1] if difficulty[i] else None,
                *(None if component_null[i, k] else float(components[i, k]) for k in range(4)),
                row_harm,
                scores_json,
                None if weighted_null[i] else float(weighted[i]),
                label,
            )
        )
    return rows


def _canceller(driver: object):
    """What stops a running ``executemany`` from another thread: sqlite3 or psycopg."""
    for name in ("interrupt", "cancel_safe", "cancel"):
        if hasattr(driver, name):
            return getattr(driver, name)
    return lambda: None


def _remember(
    pool: list[tuple[str, str | None, str]], user: str, context: str | None, response: str, reask: int
) -> tuple[str, str | None]:
    """The row's prompt (an earlier one's when ``reask`` >= 0), which joins the pool while it is small."""
    if reask >= 0 and pool:
        user, context = pool[reask % len(pool)][:2]
    if len(pool) < 512:
        pool.append((user, context, response))
    return user, context


def create_demo_database(engine: sa.Engine, options: DemoOptions, table: str = "experiences") -> int:
    """(Re)create ``table`` on ``engine`` filled with demo rows; returns the row count."""
    metadata = sa.MetaData()
    experiences = experiences_table(metadata, table)
    names = [c.name for c in experiences.columns]
    with engine.begin() as conn:
        experiences.drop(conn, checkfirst=True)
        experiences.create(conn)
    total = 0
    # DBAPI executemany: SQLAlchemy's per-row parameter processing would dominate at 10M rows.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        marks = ", ".join(["?" if engine.dialect.paramstyle == "qmark" else "%s"] * len(names))
        quoted = ", ".join(engine.dialect.identifier_preparer.quote(n) for n in names)
        sql = f"INSERT INTO {engine.dialect.identifier_preparer.quote(table)} ({quoted}) VALUES ({marks})"
        with lifecycle.cancel_on_stop(_canceller(raw.driver_connection)):
            for batch in generate(options):
                if engine.dialect.name == "sqlite":  # ISO text, as SQLite applications store timestamps
                    batch = [(r[0], r[1].isoformat(sep=" "), *r[2:]) for r in batch]  # noqa: PLW2901
                cursor.executemany(sql, batch)
                total += len(batch)
            raw.commit()
    finally:
        raw.close()
    return total


def create_database(target: str, options: DemoOptions, table: str = "experiences") -> int:
    """``target``: a SQLite file path (created or replaced) or a SQLAlchemy URL.

    A SQLite file is built as ``.NAME.PID.tmp`` beside it and renamed into place when
    complete: a killed run never leaves a file that ``--if-missing`` would then keep.
    """
    from saige_k8s.errors import InputError
    from saige_k8s.experiences.credentials import parse_url, redact
    from saige_k8s.experiences.source import check_dialect

    if not is_sqlite_path(target):
        url = parse_url(target, "--db")
        check_dialect(url)
        return _fill(url, options, table)
    path = Path(target).expanduser()
    if path.is_dir():
        raise InputError(f"--db names a directory, not a database file: {redact(str(path))}")
    if not path.parent.is_dir():
        raise InputError(f"directory does not exist: {redact(str(path.parent))}")
    remove_stale_temporaries(path.parent, f".{path.name}.*.tmp")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def remove() -> None:
        for suffix in ("", *SIDE_FILES):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)

    with lifecycle.remove_on_forced_exit(remove):
        lock = hold_lock(tmp)
        try:
            count = _fill(sa.engine.URL.create("sqlite", database=str(tmp.resolve())), options, table)
            with lifecycle.commit():
                os.replace(tmp, path)
        except OSError as exc:
            remove()
            raise InputError(f"cannot replace {redact(str(path))}: {exc.strerror}") from None
        except BaseException:
            remove()
            raise
        finally:
            os.close(lock)
    return count


def _fill(url: sa.URL, options: DemoOptions, table: str) -> int:
    from saige_k8s.errors import RuntimeFailure
    from saige_k8s.experiences.credentials import redact, scrub

    engine = sa.create_engine(url)
    try:
        return create_demo_database(engine, options, table)
    except sa.exc.OperationalError as exc:
        lifecycle.check_stop()
        raise RuntimeFailure(f"cannot write demo database to {redact(url)}: {scrub(str(exc.orig), url)}") from None
    finally:
        engine.dispose()
