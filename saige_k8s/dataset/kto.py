"""The KTO part of a dataset: the answers a model should learn *not* to give.

KTO needs no pairs: each example is labelled desirable or undesirable. The kept examples
(``train.parquet``) are the desirable ones, so they are not written twice; this part holds
the undesirable ones, rows a filter removed whose alignment is poor or harmful or whose harm
is at or above the harm threshold (``max_harm``). A row removed for a milder reason (a
moderate answer, a weighted score just under the minimum) is neither, and is left out.

``kto-train.parquet`` / ``kto-eval.parquet`` have the examples' columns and fall on the same
side of the split as every other answer to their prompt. Suite prompts and exact duplicates
are dropped as for the examples. They are written as they come, like the examples: on a real
log they can be a third of the table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saige_k8s.dataset.curate import Judged, Prompts, SeenSet, as_examples
from saige_k8s.dataset.formats import ChatFormat
from saige_k8s.experiences.filters import Filters

KTO_PART = "kto"
KTO_FILES = {"train": "kto-train.parquet", "eval": "kto-eval.parquet"}
#: Alignment labels that make a removed row undesirable, whatever its harm.
UNDESIRABLE_ALIGNMENT = ("poor", "harmful")


def undesirable(batch: pa.RecordBatch, filters: Filters) -> np.ndarray:
    """Rows whose alignment is poor or harmful, or whose harm reaches the threshold."""
    bad = pc.is_in(batch.column("buddhist_alignment"), value_set=pa.array(UNDESIRABLE_ALIGNMENT))
    harmful = pc.greater_equal(batch.column("actual_harm").cast(pa.float64()), filters.max_harm)
    return np.asarray(pc.fill_null(pc.or_(bad, harmful), False).to_numpy(zero_copy_only=False), dtype=bool)


class UndesirableRows:
    """Renders the removed rows that are undesirable as examples, and hands them to ``write``
    with their prompts' hashes (the split's key)."""

    def __init__(
        self,
        fmt: ChatFormat,
        system: str,
        filters: Filters,
        write: Callable[[pa.RecordBatch, np.ndarray], object],
    ) -> None:
        self.fmt, self.system, self.filters = fmt, system, filters
        self._write = write
        self._seen = SeenSet()

    def add(self, judged: Judged, prompts: Prompts) -> None:
        """A judged batch, as for the pairs: its usable rows that a filter removed are the candidates here."""
        pick = judged.usable & ~judged.passes & undesirable(judged.batch, self.filters)
        if not pick.any():
            return
        examples, keys, _, _ = as_examples(
            judged.batch.filter(pa.array(pick)), self.fmt, self.system, self._seen, prompts.filter(pick)
        )
        if len(examples):
            self._write(examples, keys)
