"""The trained chat format for the engines that serve a model: a Jinja chat template, an Ollama Modelfile.

Both are built from the same pieces as the dataset's ``text``, so a served model is prompted
byte for byte as it was trained. The dataset holds one exchange per example; a later user
turn opens as each format's reference template opens it (Zephyr, Mistral, Llama 3), right
after the previous answer's end-of-turn marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from saige_k8s.dataset.formats import FORMATS, ChatFormat, prompt_prefix
from saige_k8s.errors import InputError

#: The opening of a user turn that follows an answer.
_NEXT_USER_OPEN: Final = {
    "tinyllama": "\n<|user|>\n",
    "mistral": "[INST] ",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n",
}


@dataclass(frozen=True)
class TurnPieces:
    """Literal text around each message; ``content`` goes between."""

    system_open: str | None  # None: the format has no system turn
    first_user_after_system: str
    first_user_alone: str
    next_user: str
    assistant_open: str
    end_of_turn: str


def pieces(format_name: str) -> TurnPieces:
    fmt: ChatFormat = FORMATS[format_name]
    alone, _ = prompt_prefix(fmt, "")
    return TurnPieces(
        system_open=fmt.system_open,
        first_user_after_system=fmt.user_open,
        first_user_alone=alone,
        next_user=_NEXT_USER_OPEN[format_name],
        assistant_open=fmt.assistant_open,
        end_of_turn=fmt.end_of_turn,
    )


def _jinja_string(text: str) -> str:
    """A Jinja string literal for ``text``, using only the escapes every Jinja engine reads
    (jinja2, minijinja, llama.cpp's): backslash, double quote, newline, carriage return, tab.
    """
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    escaped = escaped.replace("\t", "\\t")
    if any(ord(c) < 0x20 for c in escaped):
        raise InputError(f"a control character cannot be written into a chat template: {text[:80]!r}")
    return f'"{escaped}"'


def chat_template(format_name: str, system: str) -> str:
    """A Jinja chat template (``tokenizer.chat_template``) that renders ``messages`` as the dataset's text.

    No system message means the trained system prompt ``system``; user and assistant
    contents are trimmed as extraction trims them; ``add_generation_prompt`` ends the text
    where the trained answers start.
    """
    p = pieces(format_name)
    q = _jinja_string
    if p.system_open is None:
        head = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{ raise_exception('this model was trained without a system turn') }}{%- endif -%}"
            "{%- set system = '' -%}{%- set turns = messages -%}"
        )
    else:
        head = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system = {q(system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
            f"{{%- if system -%}}{{{{ {q(p.system_open)} + system }}}}{{%- endif -%}}"
        )
    first_user = f"(({q(p.first_user_after_system)}) if system else ({q(p.first_user_alone)}))"
    body = (
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant/user/...') }}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ ({first_user} if loop.first else {q(p.next_user)}) + message['content'] | trim }}}}"
        "{%- else -%}"
        f"{{{{ {q(p.assistant_open)} + message['content'] | trim + {q(p.end_of_turn)} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(p.assistant_open)} }}}}{{%- endif -%}}"
    )
    return head + body


def ollama_template(format_name: str) -> str:
    """The Modelfile TEMPLATE (Go text/template over Ollama's ``.System`` and ``.Messages``).

    Every earlier turn of a chat is rendered, as in training; the last message, when it is
    the user's, is followed by the assistant's opening, where the answer starts. No ``{{-``:
    the pieces' own trailing newlines are part of the format.
    """
    p = pieces(format_name)
    for piece in (p.system_open or "", p.first_user_after_system, p.first_user_alone, p.next_user, p.assistant_open):
        if "{{" in piece or "}}" in piece:  # never: the formats' pieces are plain text
            raise InputError(f"format {format_name} cannot be written as a Go template")
    if p.system_open is None:
        head, first_user = "", p.first_user_alone
    else:
        head = f"{{{{ if .System }}}}{p.system_open}{{{{ .System }}}}{{{{ end }}}}"
        first_user = f"{{{{ if $.System }}}}{p.first_user_after_system}{{{{ else }}}}{p.first_user_alone}{{{{ end }}}}"
    return (
        head + "{{ $first := true }}"
        "{{ range $i, $m := .Messages }}"
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "user" }}'
        f"{{{{ if $first }}}}{first_user}{{{{ else }}}}{p.next_user}{{{{ end }}}}"
        "{{ $first = false }}{{ .Content }}"
        f"{{{{ if $last }}}}{p.assistant_open}{{{{ end }}}}"
        '{{ else if eq .Role "assistant" }}'
        f"{p.assistant_open}{{{{ .Content }}}}{{{{ if not $last }}}}{p.end_of_turn}{{{{ end }}}}"
        "{{ end }}"
        "{{ end }}"
    )


def modelfile_text(value: str, what: str) -> str:
    """``value`` as a triple-quoted Modelfile argument, or an error when it cannot be one.

    Ollama's parser ends the argument at the first ``\"\"\"`` and drops characters it cannot
    print, with no escape: a prompt holding either would be cut or turned into directives.
    """
    if '"""' in value:
        raise InputError(f'{what} holds """, which would end the Modelfile\'s quoted text early: {value[:80]!r}')
    bad = sorted({repr(c) for c in value if not c.isprintable() and c not in "\n\t"})
    if bad:
        raise InputError(f"{what} holds characters Ollama's Modelfile drops ({', '.join(bad)})")
    return f'"""{value}"""'


def modelfile(format_name: str, system: str, model: str, stop: str, adapter: str | None = None) -> str:
    """An Ollama Modelfile: ``FROM model`` (+ ``ADAPTER adapter``), the trained template, stop and system prompt.

    ``stop`` is the text of the trained end-of-turn token. A format without a system turn
    (mistral) gets no SYSTEM.
    """
    for path, what in ((model, "FROM"), (adapter, "ADAPTER")):
        if path is not None and (not path.strip() or any(c in path for c in "\n\r")):
            raise InputError(f"{what} path {path!r} cannot be written into a Modelfile")
    lines = [f"FROM {model}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {modelfile_text(ollama_template(format_name), 'the template')}")
    if not stop or any(c in stop for c in '"\n\r'):
        raise InputError(f"stop token {stop!r} cannot be written into a Modelfile")
    lines.append(f'PARAMETER stop "{stop}"')
    if system and FORMATS[format_name].system_open is not None:
        lines.append(f"SYSTEM {modelfile_text(system, 'the system prompt')}")
    return "\n".join(lines) + "\n"
