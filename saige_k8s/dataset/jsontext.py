"""JSON from table rows, read within limits that one hostile row cannot break.

Python's parser recurses once per nesting level, so a deep enough text raises
RecursionError, at a depth that depends on the caller's stack. A fixed depth limit, checked
before parsing, makes the outcome the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where columns are judged: the chat formats' text helpers need neither
    import numpy as np
    import pyarrow as pa

#: Deeper than any real context or score object; far below the parser's recursion limit.
MAX_DEPTH = 64


def nesting_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest outside JSON strings, whether or not the text is valid JSON."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def too_deep(text: str) -> bool:
    """Nested deeper than MAX_DEPTH; counting brackets first keeps the common case in C."""
    return text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH


def too_deep_mask(texts: pa.Array) -> np.ndarray:
    """``too_deep`` for a string column: brackets are counted only in texts long enough to hold
    that many, and only texts with that many are scanned in Python."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = np.zeros(len(texts), dtype=bool)
    long = np.flatnonzero(pc.fill_null(pc.greater(pc.binary_length(texts), MAX_DEPTH), False).to_numpy(False))
    if not len(long):
        return mask
    candidates = texts.take(pa.array(long))
    brackets = pc.add(pc.count_substring(candidates, "["), pc.count_substring(candidates, "{"))
    for i in np.flatnonzero(pc.greater(brackets, MAX_DEPTH).to_numpy(zero_copy_only=False)):
        mask[long[i]] = nesting_depth(candidates[int(i)].as_py()) > MAX_DEPTH
    return mask


class JsonObject(list):
    """A parsed object as its (key, value) pairs in order, duplicates kept (``object_pairs_hook``)."""
