"""Reading the project's YAML files (the spec, evaluation suites): one loader, one set of messages.

It lives below ``spec`` and ``dataset`` so both can use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from saige_k8s.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first})")


class UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML keeps the last of two equal keys; a file that says two things is refused instead.

    libyaml's parser where PyYAML has it: the shipped evaluation suite, read by every
    extraction, parses ten times faster."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" merges are meant to be overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if duplicate:
                raise DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, origin: str) -> Any:
    """The document in ``text``; a syntax error or a repeated key is a ConfigError naming ``origin``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a safe loader
    except DuplicateKeyError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{origin}: not valid YAML{where}") from None


def read_yaml(path: Path, what: str) -> Any:
    """``parse_yaml`` of a file; ``what`` names the kind of file in the message when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    return parse_yaml(text, str(path))


def validate_document(model: type[_M], data: Any, origin: str) -> _M:
    """A loaded document as ``model``; its first problem as one line naming the file and the place."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, origin)) from None


def describe(exc: ValidationError, origin: str) -> str:
    """The first problem as ``origin: scenarios[3].good: message`` (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    # A list-wide check (a duplicate id) says in its ctx which item and field it is about.
    loc = (*first["loc"], *first.get("ctx", {}).get("loc", ()))
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{origin}: {where or '(top level)'}: {message(first)}{more}"


def message(error: Any) -> str:
    """One pydantic error in the project's words."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    text = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict | list | BaseModel):
        text += f" (got {error['input']!r})"
    return text
