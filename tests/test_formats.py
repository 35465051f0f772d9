"""The three chat formats, byte for byte as the seed's examples spell them."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from saige_k8s.dataset.formats import DEFAULT_SYSTEM_PROMPT, FORMATS, describe_context, render, render_columns

SYSTEM = DEFAULT_SYSTEM_PROMPT
USER = "I'm struggling with anxiety. What should I do?"
CONTEXT = json.dumps({"emotional_state": "anxious", "vulnerability": "high"})
RESPONSE = "I understand how difficult anxiety can be. It's a real struggle, and you're not alone."

EXPECTED = {
    "tinyllama": (
        f"<|system|>\n{SYSTEM}</s>\n<|user|>\n{USER}\n\n[Context: Person is anxious, vulnerability level: high]</s>\n"
        f"<|assistant|>\n{RESPONSE}</s>"
    ),
    "mistral": f"<s>[INST] {USER}\n\nContext: Person is anxious, vulnerability: high [/INST] {RESPONSE}</s>",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{USER}\n\n[Context: Person is anxious, vulnerability level: high]<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{RESPONSE}<|eot_id|>"
    ),
}


def test_system_prompt_is_the_seeds() -> None:
    assert SYSTEM == (
        "You are an AI assistant practicing ethical communication. You respond with wisdom, "
        "compassion, and truthfulness while minimizing harm."
    )


@pytest.mark.parametrize("name", list(EXPECTED))
def test_json_context_matches_design(name: str) -> None:
    prompt, completion = render(FORMATS[name], SYSTEM, USER, CONTEXT, RESPONSE)
    assert prompt + completion == EXPECTED[name]
    assert completion == RESPONSE + FORMATS[name].end_of_turn  # the prompt mask ends exactly here


@pytest.mark.parametrize("name", list(EXPECTED))
def test_free_text_and_missing_context(name: str) -> None:
    fmt = FORMATS[name]
    free = "".join(render(fmt, SYSTEM, USER, "  Follow-up about work.  ", RESPONSE))
    json_block = (
        "\n\nContext: Person is anxious, vulnerability: high"
        if name == "mistral"
        else "\n\n[Context: Person is anxious, vulnerability level: high]"
    )
    free_block = "\n\nContext: Follow-up about work." if name == "mistral" else "\n\n[Context: Follow-up about work.]"
    assert free == EXPECTED[name].replace(json_block, free_block)
    for empty in (None, "", "   ", "{}"):
        text = "".join(render(fmt, SYSTEM, USER, empty, RESPONSE))
        assert "Context" not in text
        assert USER + fmt.assistant_open in text  # no context block, no blank lines


def test_context_descriptions() -> None:
    fmt = FORMATS["tinyllama"]
    assert describe_context('{"emotional_state": "sad"}', fmt) == "Person is sad"
    assert describe_context('{"vulnerability": "low", "topic": "work"}', fmt) == "vulnerability level: low, topic: work"
    assert describe_context("{not json", fmt) == "{not json"
    assert describe_context("[1, 2]", fmt) == "[1, 2]"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_column_renderer_equals_row_renderer(name: str) -> None:
    contexts = [CONTEXT, None, "free text", "", "{}", '{"emotional_state": "calm", "extra": 3}', "{broken", CONTEXT]
    users = [f"question {i}" for i in range(len(contexts))]
    responses = [f"answer {i} ✓" for i in range(len(contexts))]
    fmt = FORMATS[name]
    turns, texts = render_columns(fmt, SYSTEM, pa.array(users), pa.array(contexts, pa.string()), pa.array(responses))
    expected = ["".join(render(fmt, SYSTEM, u, c, r)) for u, c, r in zip(users, contexts, responses, strict=True)]
    assert texts.to_pylist() == expected
    assert all(t in x for t, x in zip(turns.to_pylist(), texts.to_pylist(), strict=True))


def test_empty_system_prompt_drops_the_system_turn() -> None:
    text = "".join(render(FORMATS["tinyllama"], "", USER, None, RESPONSE))
    assert text == f"<|user|>\n{USER}</s>\n<|assistant|>\n{RESPONSE}</s>"
