"""Preference pairs: for each prompt, its best kept answer against its worst removed one.

Experiences share a prompt when their rendered prompts are byte-identical (keyed by the
prompt's xxh3 hash, the key of the train/eval split too). Rows stream in once, in id order,
with a mark saying whether they passed every filter; each batch is reduced to one best kept
and one worst removed row per prompt, and those reductions are merged as they pile up.

What is held per prompt is what choosing needs, no text: the key, the id, the place in id
order, the weighted score and the harm (about 40 bytes). On a log whose prompts are nearly
all distinct, holding each one's answer until the end would hold most of the table. Only the
rows that end up in a pair are read again, by id, for their texts and scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saige_k8s.dataset.curate import MESSAGE_TYPE, Judged, Prompts, conversations, messages_of, prompts_of
from saige_k8s.dataset.formats import ChatFormat
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

PAIRS_PART = "pairs"
PAIRS_FILES = {"train": "pairs-train.parquet", "eval": "pairs-eval.parquet"}
#: TRL's conversational preference format, with what the evaluation groups pairs by.
PAIRS_SCHEMA = pa.schema(
    [
        ("prompt", MESSAGE_TYPE),
        ("chosen", MESSAGE_TYPE),
        ("rejected", MESSAGE_TYPE),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("margin_weighted", pa.float64()),
        ("margin_harm", pa.float64()),
        ("principle", pa.string()),
        ("component", pa.string()),
        ("format", pa.string()),
    ]
)
#: Merge the pending reductions once they outgrow the merged state (and this floor).
_MERGE_FLOOR = 65_536


#: A function that reads the rows of these ids again, judged as the scan judged them (any order).
Fetch = Callable[[pa.Array], pa.Table]


class PairBuilder:
    """Collects, per prompt, the best row that passed every filter and the worst one a filter removed."""

    def __init__(self, fmt: ChatFormat, system: str) -> None:
        self.fmt, self.system = fmt, system
        self._state: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, judged: Judged, prompts: Prompts) -> None:
        """A judged batch (``seq``: each row's place in id order): its usable rows, kept by every filter or not."""
        keep = judged.usable & ~prompts.suite
        if not keep.any():
            return
        batch = judged.batch
        table = pa.table(
            {
                "key": pa.array(prompts.key),
                "seq": batch.column("seq"),
                "passes": pa.array(judged.passes),
                "buddhist_weighted_score": batch.column("buddhist_weighted_score").cast(pa.float64()),
                "actual_harm": batch.column("actual_harm").cast(pa.float64()),
                "id": batch.column("id"),
            }
        )
        if not keep.all():
            table = table.filter(pa.array(keep))
        part = _reduce(table)
        self._pending.append(part)
        self._pending_rows += len(part)
        if self._pending_rows > max(_MERGE_FLOOR, len(self._state) if self._state is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._state] if self._state is not None else []) + self._pending
        self._state = _reduce(pa.concat_tables(parts)) if parts else None
        self._pending, self._pending_rows = [], 0

    def pairs(self, fetch: Fetch) -> tuple[pa.Table, np.ndarray]:
        """(the pairs in the order of their chosen rows, their prompts' hashes: the split's key, as for SFT).

        A row read again that is gone, or whose prompt is no longer the one it was chosen for
        (the table changed between the scan and the read), drops its pair.
        """
        self._merge()
        state = self._state
        if state is None or not len(state):
            return PAIRS_SCHEMA.empty_table(), np.zeros(0, dtype=np.uint64)
        passes = state.column("passes").to_numpy(zero_copy_only=False)
        kept, removed = state.filter(pa.array(passes)), state.filter(pa.array(~passes))
        _, ik, ir = np.intersect1d(
            kept.column("key").to_numpy(), removed.column("key").to_numpy(), assume_unique=True, return_indices=True
        )
        kept, removed = kept.take(pa.array(ik)), removed.take(pa.array(ir))
        order = pa.array(np.argsort(kept.column("seq").to_numpy(), kind="stable"))
        kept, removed = kept.take(order), removed.take(order)
        wanted = pa.concat_arrays([kept.column("id").combine_chunks(), removed.column("id").combine_chunks()])
        rows = fetch(wanted) if len(wanted) else None
        if rows is None or not len(rows):
            return PAIRS_SCHEMA.empty_table(), np.zeros(0, dtype=np.uint64)
        chosen, rejected = (self._read_again(rows, side) for side in (kept, removed))
        keep = chosen.found & rejected.found
        keep[keep] = np.asarray(
            pc.not_equal(
                chosen.rows.column("response").filter(pa.array(keep)),
                rejected.rows.column("response").filter(pa.array(keep)),
            ).to_numpy(zero_copy_only=False),
            bool,
        )
        mask = pa.array(keep)
        table = self._table(chosen.rows.filter(mask), chosen.turn.filter(mask), rejected.rows.filter(mask))
        return table, kept.column("key").to_numpy()[keep]

    def _read_again(self, rows: pa.Table, side: pa.Table) -> _ReadAgain:
        """``side``'s rows as read again (in ``side``'s order), and which of them still match."""
        at = pc.index_in(side.column("id"), value_set=rows.column("id").combine_chunks())
        found = ~np.asarray(at.is_null().to_numpy(zero_copy_only=False), bool)
        taken = rows.take(pc.fill_null(at, 0)).combine_chunks()
        prompts = prompts_of(taken.to_batches()[0], self.fmt, self.system)  # one batch: the chunks are combined
        found &= prompts.key == side.column("key").to_numpy()
        return _ReadAgain(taken, prompts.turn, found)

    def _table(self, chosen: pa.Table, turn: pa.Array, rejected: pa.Table) -> pa.Table:
        """The pairs' columns, from the rows read again (``turn``: the chosen rows' user turns)."""
        n = len(chosen)

        def values(table: pa.Table, names: tuple[str, ...]) -> np.ndarray:
            return np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(float) for c in names])

        virtue = values(chosen, PRINCIPLES) - values(rejected, PRINCIPLES)
        harm = values(rejected, HARM_COMPONENTS) - values(chosen, HARM_COMPONENTS)
        known = ~np.isnan(harm).all(axis=1)
        # argmax takes the first of equal values: ties go in the order of PRINCIPLES and HARM_COMPONENTS.
        component = np.argmax(np.where(np.isnan(harm), -np.inf, harm), axis=1) if n else np.zeros(0, dtype=int)
        weighted, total_harm = ("buddhist_weighted_score", "actual_harm")

        def reply(table: pa.Table) -> pa.ListArray:
            return messages_of(["assistant"], table.column("response").combine_chunks().cast(pa.string()), n)

        def number(table: pa.Table, name: str) -> pa.ChunkedArray:
            return table.column(name).cast(pa.float64())

        return pa.table(
            {
                "prompt": conversations(self.fmt, self.system, turn),
                "chosen": reply(chosen),
                "rejected": reply(rejected),
                "chosen_id": chosen.column("id").cast(pa.string()),
                "rejected_id": rejected.column("id").cast(pa.string()),
                "margin_weighted": pc.subtract(number(chosen, weighted), number(rejected, weighted)),
                "margin_harm": pc.subtract(number(rejected, total_harm), number(chosen, total_harm)),
                "principle": pa.array([PRINCIPLES[k] for k in np.argmax(virtue, axis=1)] if n else [], pa.string()),
                "component": pa.array(
                    [HARM_COMPONENTS[k] if ok else None for k, ok in zip(component, known, strict=True)], pa.string()
                ),
                "format": pa.array([self.fmt.name] * n, pa.string()),
            },
            schema=PAIRS_SCHEMA,
        )


class _ReadAgain(NamedTuple):
    rows: pa.Table
    turn: pa.Array
    found: np.ndarray


def _reduce(table: pa.Table) -> pa.Table:
    """Per (prompt, passed): the kept row with the highest weighted score, then lowest harm, then
    first in id order; the removed row with the lowest weighted score, then highest harm, then first.

    ``table`` is in id order within each (prompt, passed): a batch is, and a merge concatenates
    the earlier state before the later parts. The sort is stable, so ties stay in that order.
    """
    if not len(table):
        return table
    key = table.column("key").to_numpy()
    passes = table.column("passes").to_numpy(zero_copy_only=False)
    weighted = table.column("buddhist_weighted_score").to_numpy(zero_copy_only=False)
    harm = table.column("actual_harm").to_numpy(zero_copy_only=False)
    sign = np.where(passes, -1.0, 1.0)  # kept: best first; removed: worst first
    order = np.lexsort((-sign * harm, sign * weighted, passes, key))
    k, p = key[order], passes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (k[1:] != k[:-1]) | (p[1:] != p[:-1])
    return table.take(pa.array(order[first]))
