"""Chat formats, byte-exact with the seed's examples.

A format is a handful of literal pieces. ``render`` joins them for one example (training
uses it to mask the prompt exactly); ``user_turn_columns`` and ``text_columns`` (together,
``render_columns``) join the same pieces for whole Arrow columns (extraction). Both read the
same pieces, so they cannot drift apart.

The user message and the response are trimmed of all surrounding whitespace first (Python's
``str.strip`` and Arrow's ``utf8_trim_whitespace`` agree on what that is), as the official
Llama 3 template trims every message: stray newlines would otherwise be learnt as content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from saige_k8s.dataset.jsontext import too_deep

if TYPE_CHECKING:  # pyarrow is imported where columns are rendered: the command line's --help needs none
    import pyarrow as pa

FormatName = Literal["tinyllama", "mistral", "llama3"]

DEFAULT_SYSTEM_PROMPT: Final = (
    "You are an AI assistant practicing ethical communication. "
    "You respond with wisdom, compassion, and truthfulness while minimizing harm."
)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    #: Text before the system prompt, or None when the format has no system turn.
    system_open: str | None
    #: Between the system prompt and the user turn (or the start of the user turn).
    user_open: str
    #: After the user turn, up to where the response starts.
    assistant_open: str
    #: Ends the response: what the model must learn to emit to stop.
    end_of_turn: str
    #: Context block templates: ``{}`` is the rendered context.
    context_block: str
    #: Words for a JSON context's vulnerability (the formats differ, as in the seed).
    vulnerability_label: str

    def system_part(self, system: str) -> str:
        return "" if self.system_open is None or not system else f"{self.system_open}{system}"


FORMATS: Final[dict[str, ChatFormat]] = {
    "tinyllama": ChatFormat(
        name="tinyllama",
        system_open="<|system|>\n",
        user_open="</s>\n<|user|>\n",
        assistant_open="</s>\n<|assistant|>\n",
        end_of_turn="</s>",
        context_block="\n\n[Context: {}]",
        vulnerability_label="vulnerability level",
    ),
    "mistral": ChatFormat(
        name="mistral",
        system_open=None,
        user_open="<s>[INST] ",
        assistant_open=" [/INST] ",
        end_of_turn="</s>",
        context_block="\n\nContext: {}",
        vulnerability_label="vulnerability",
    ),
    "llama3": ChatFormat(
        name="llama3",
        system_open="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
        user_open="<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        assistant_open="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        context_block="\n\n[Context: {}]",
        vulnerability_label="vulnerability level",
    ),
}

# When there is no system turn the user turn opens the text; these are its opening pieces.
_BARE_USER_OPEN: Final = {
    "tinyllama": "<|user|>\n",
    "mistral": "<s>[INST] ",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
}


def describe_context(context: str | None, fmt: ChatFormat) -> str | None:
    """The words inside the context block, or None for no block.

    A JSON object reads as a sentence (``Person is anxious, vulnerability level: high``),
    other keys as ``key: value``; anything else is free text, used as it is, as is JSON whose
    strings are no Unicode text (lone surrogate escapes). Text nested too deep to parse
    safely is never parsed (extraction drops such rows before rendering).
    """
    if context is None or not context.strip():
        return None
    text = context.strip()
    if text.startswith("{") and not too_deep(text):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            return text
        if isinstance(parsed, dict):
            described = _describe_object(parsed, fmt)
            return text if described is not None and not _is_unicode(described) else described
    return text


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's ``\\ud800``), which has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe_object(obj: dict, fmt: ChatFormat) -> str | None:
    parts = []
    rest = dict(obj)
    state = rest.pop("emotional_state", None)
    vulnerability = rest.pop("vulnerability", None)
    if state not in (None, ""):
        parts.append(f"Person is {state}")
    if vulnerability not in (None, ""):
        parts.append(f"{fmt.vulnerability_label}: {vulnerability}")
    parts.extend(f"{key}: {value}" for key, value in rest.items() if value not in (None, ""))
    return ", ".join(parts) if parts else None


def user_turn(user: str, context: str | None, fmt: ChatFormat) -> str:
    """The user's message, trimmed, with its context block, as it appears in the text and ``messages``."""
    described = describe_context(context, fmt)
    user = user.strip()
    return user if described is None else user + fmt.context_block.format(described)


def prompt_prefix(fmt: ChatFormat, system: str) -> tuple[str, str]:
    """(text before the user turn, text between the user turn and the response)."""
    head = fmt.system_part(system)
    return (head + fmt.user_open if head else _BARE_USER_OPEN[fmt.name]), fmt.assistant_open


def render(fmt: ChatFormat, system: str, user: str, context: str | None, response: str) -> tuple[str, str]:
    """(prompt, completion) for one example; ``prompt + completion`` is the dataset's text."""
    return render_turns(fmt, system, user_turn(user, context, fmt), response.strip())


def render_turns(fmt: ChatFormat, system: str, turn: str, response: str) -> tuple[str, str]:
    """``render`` from a finished user turn (the dataset's ``messages``): what training masks by."""
    before, after = prompt_prefix(fmt, system)
    return before + turn + after, response + fmt.end_of_turn


def render_columns(
    fmt: ChatFormat,
    system: str,
    user: pa.Array,
    context: pa.Array,
    response: pa.Array,
    *,
    trimmed: bool = False,
) -> tuple[pa.Array, pa.Array]:
    """(user turn, text) for whole columns: ``render`` for every row, without a Python loop.

    ``trimmed``: the caller has trimmed ``user`` and ``response`` already (extraction does,
    to judge emptiness).
    """
    import pyarrow.compute as pc

    if not trimmed:
        user, response = pc.utf8_trim_whitespace(user), pc.utf8_trim_whitespace(response)
    turn = user_turn_columns(fmt, user, context)
    return turn, text_columns(fmt, system, turn, response)


def user_turn_columns(fmt: ChatFormat, user: pa.Array, context: pa.Array) -> pa.Array:
    """``user_turn`` for whole columns of trimmed messages. Contexts repeat a lot, so each
    distinct one is described once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(context)
    blocks = pa.array(
        [
            "" if (d := describe_context(v, fmt)) is None else fmt.context_block.format(d)
            for v in encoded.dictionary.to_pylist()
        ],
        pa.string(),
    )
    block = pc.fill_null(blocks.take(encoded.indices), "")
    return pc.binary_join_element_wise(user, block, "")


def text_columns(fmt: ChatFormat, system: str, turn: pa.Array, response: pa.Array) -> pa.Array:
    """The dataset's text of each row, from its user turn and its trimmed response."""
    import pyarrow.compute as pc

    before, after = prompt_prefix(fmt, system)
    return pc.binary_join_element_wise(before, turn, after, response, fmt.end_of_turn, "")
