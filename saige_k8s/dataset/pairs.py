"""Preference pairs: for each prompt, its best kept answer against its worst removed one.

Experiences share a prompt when their rendered prompts are byte-identical (keyed by the
prompt's xxh3 hash, the key of the train/eval split too). Rows stream in once, in id order,
with a mark saying whether they passed every filter; each batch is reduced to one best kept
and one worst removed row per prompt, and those reductions are merged as they pile up, so
memory holds at most two rows per distinct prompt, never the table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saige_k8s.dataset.curate import MESSAGE_TYPE, content_hashes, conversations, messages_of, prompts
from saige_k8s.dataset.formats import ChatFormat, render_columns
from saige_k8s.experiences.schema import HARM_COMPONENTS, PRINCIPLES

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
_NUMBERS = ("buddhist_weighted_score", "actual_harm", *PRINCIPLES, *HARM_COMPONENTS)
#: Merge the pending reductions once they outgrow the merged state (and this floor).
_MERGE_FLOOR = 65_536


class PairBuilder:
    """Collects, per prompt, the best row that passed every filter and the worst one a filter removed."""

    def __init__(self, fmt: ChatFormat, system: str, excluded: pa.Array) -> None:
        self.fmt, self.system, self.excluded = fmt, system, excluded
        self._state: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch, passes: np.ndarray) -> None:
        """Valid rows (texts and scores judged, ``seq``: their place in id order); ``passes``: kept by every filter."""
        if not len(batch):
            return
        turn, _ = render_columns(
            self.fmt,
            self.system,
            batch.column("user_message"),
            batch.column("context"),
            pa.nulls(len(batch), pa.string()),
            trimmed=True,
        )
        prompt = prompts(self.fmt, self.system, turn)
        columns = {
            "key": pa.array(content_hashes(prompt)),
            "seq": batch.column("seq"),
            "passes": pa.array(passes),
            **{c: batch.column(c).cast(pa.float64()) for c in _NUMBERS},
            "id": batch.column("id").cast(pa.string()),
            "turn": turn,
            "response": batch.column("response"),
        }
        table = pa.table(columns)
        if len(self.excluded):
            table = table.filter(pc.invert(pc.is_in(prompt, value_set=self.excluded)))
        part = _reduce(table)
        self._pending.append(part)
        self._pending_rows += len(part)
        if self._pending_rows > max(_MERGE_FLOOR, len(self._state) if self._state is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._state] if self._state is not None else []) + self._pending
        self._state = _reduce(pa.concat_tables(parts)) if parts else None
        self._pending, self._pending_rows = [], 0

    def pairs(self) -> tuple[pa.Table, np.ndarray]:
        """(the pairs in the order of their chosen rows, their prompts' hashes: the split's key, as for SFT)."""
        self._merge()
        state = self._state
        if state is None or not len(state):
            return PAIRS_SCHEMA.empty_table(), np.zeros(0, dtype=np.uint64)
        passes = state.column("passes").to_numpy(zero_copy_only=False)
        kept, removed = state.filter(pa.array(passes)), state.filter(pa.array(~passes))
        keys_kept = kept.column("key").to_numpy()
        keys_removed = removed.column("key").to_numpy()
        _, ik, ir = np.intersect1d(keys_kept, keys_removed, assume_unique=True, return_indices=True)
        chosen, rejected = kept.take(pa.array(ik)), removed.take(pa.array(ir))
        differ = pc.not_equal(chosen.column("response"), rejected.column("response"))
        chosen, rejected = chosen.filter(differ), rejected.filter(differ)
        order = pa.array(np.argsort(chosen.column("seq").to_numpy(), kind="stable"))
        chosen, rejected = chosen.take(order), rejected.take(order)
        return self._table(chosen, rejected), chosen.column("key").to_numpy()

    def _table(self, chosen: pa.Table, rejected: pa.Table) -> pa.Table:
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

        return pa.table(
            {
                "prompt": conversations(self.fmt, self.system, chosen.column("turn").combine_chunks()),
                "chosen": reply(chosen),
                "rejected": reply(rejected),
                "chosen_id": chosen.column("id"),
                "rejected_id": rejected.column("id"),
                "margin_weighted": pc.subtract(chosen.column(weighted), rejected.column(weighted)),
                "margin_harm": pc.subtract(rejected.column(total_harm), chosen.column(total_harm)),
                "principle": pa.array([PRINCIPLES[k] for k in np.argmax(virtue, axis=1)] if n else [], pa.string()),
                "component": pa.array(
                    [HARM_COMPONENTS[k] if ok else None for k, ok in zip(component, known, strict=True)], pa.string()
                ),
                "format": pa.array([self.fmt.name] * n, pa.string()),
            },
            schema=PAIRS_SCHEMA,
        )


def _reduce(table: pa.Table) -> pa.Table:
    """Per (prompt, passed): the kept row with the highest weighted score, then lowest harm, then
    first in id order; the removed row with the lowest weighted score, then highest harm, then first."""
    if not len(table):
        return table
    key = table.column("key").to_numpy()
    passes = table.column("passes").to_numpy(zero_copy_only=False)
    weighted = table.column("buddhist_weighted_score").to_numpy(zero_copy_only=False)
    harm = table.column("actual_harm").to_numpy(zero_copy_only=False)
    seq = table.column("seq").to_numpy(zero_copy_only=False)
    sign = np.where(passes, -1.0, 1.0)  # kept: best first; removed: worst first
    order = np.lexsort((seq, -sign * harm, sign * weighted, passes, key))
    k, p = key[order], passes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (k[1:] != k[:-1]) | (p[1:] != p[:-1])
    return table.take(pa.array(order[first]))
