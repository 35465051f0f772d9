"""Training data: the dataset's examples as token ids with the prompt masked exactly.

Each example is rendered by the extraction's renderer (``render_turns``), tokenized once as
a whole, and a token is a label when it covers any character of the completion (the
response and its end-of-turn marker). A token that straddles the boundary, like
SentencePiece's ``▁I`` after ``[/INST]``, is therefore learnt, not masked. The end-of-turn
marker is always learnt, as the tokenizer's single end token where it has one, so the
model learns to stop. Padding never becomes a label, whatever its id.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from saige_k8s.dataset.formats import FORMATS, prompt_prefix, render_turns
from saige_k8s.dataset.kto import KTO_FILES
from saige_k8s.dataset.writer import MANIFEST
from saige_k8s.errors import InputError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class LoadedDataset:
    path: Path
    manifest: dict[str, Any]
    format: str
    system: str
    train: list[tuple[str, str]]  # (user turn, response)
    eval: list[tuple[str, str]]
    #: The train examples' weighted scores, in their order (None where unknown).
    train_scores: list[float | None] = field(default_factory=list)


def load_dataset_dir(path: Path) -> LoadedDataset:
    """Read a published dataset, or the seed's CSV; errors say what is wrong."""
    if path.suffix == ".csv" and path.is_file():
        return load_csv(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise InputError(f"not a complete dataset (no {MANIFEST}): {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"corrupt dataset manifest {manifest_path}: {exc}") from None
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise InputError(f"dataset {path} has unknown format {fmt!r}")
    splits = {split: _read_part(path / f"{split}.parquet", ["messages"], [SCORE]) for split in ("train", "eval")}
    if not splits["train"]:
        raise InputError(f"dataset {path} has no training examples")
    turns = {split: [_turns(row["messages"]) for row in rows] for split, rows in splits.items()}
    scores = [row.get(SCORE) for row in splits["train"]]
    return LoadedDataset(path, manifest, fmt, manifest.get("system_prompt", ""), turns["train"], turns["eval"], scores)


SCORE = "buddhist_weighted_score"


def _read_part(file: Path, columns: list[str], optional: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of one of the dataset's Parquet files (none when it is absent: no such split).

    ``optional`` columns are read where the file has them (a hand-made dataset may carry only
    ``messages``; weighting by score then has nothing to weight by)."""
    if not file.exists():
        return []
    try:
        parquet = pq.ParquetFile(file)
        present = set(parquet.schema_arrow.names)
        return parquet.read(columns=[*columns, *(c for c in optional if c in present)]).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"corrupt dataset file {file}: {exc}") from None


@dataclass(frozen=True)
class PairText:
    system: str
    turn: str
    chosen: str
    rejected: str


def load_pairs(data: LoadedDataset, split: str) -> list[PairText]:
    """The extraction's preference pairs of ``split`` (best kept answer against worst removed one)."""
    rows = _read_part(data.path / f"pairs-{split}.parquet", ["prompt", "chosen", "rejected"])
    pairs = []
    for row in rows:
        prompt = {m["role"]: m["content"] for m in row["prompt"]}
        system = prompt.get("system", data.system)
        pairs.append(PairText(system, prompt["user"], row["chosen"][0]["content"], row["rejected"][0]["content"]))
    return pairs


def load_undesirable(data: LoadedDataset, split: str) -> list[tuple[str, str]]:
    """The KTO part of ``split``: answers a filter removed as poor, harmful or too harmful."""
    return [_turns(row["messages"]) for row in _read_part(data.path / KTO_FILES[split], ["messages"])]


CSV_EVAL_FRACTION = 0.05


def load_csv(path: Path) -> LoadedDataset:
    """The seed's CSV (``extract --csv``): ``text`` split back into turns by its ``format``.

    A CSV has no eval split; 5 % of the rows are held out by a hash of their id, as
    extraction does.
    """
    import pyarrow.csv as pcsv

    from saige_k8s.dataset.curate import eval_mask

    try:
        table = pcsv.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"cannot read CSV {path}: {str(exc).splitlines()[0]}") from None
    missing = {"id", "text", "format"} - set(table.column_names)
    if missing or not table.num_rows:
        raise InputError(f"CSV {path} needs rows with id, text and format columns (missing: {sorted(missing)})")
    formats = set(table.column("format").to_pylist())
    if len(formats) != 1 or (fmt := formats.pop()) not in FORMATS:
        raise InputError(f"CSV {path} must hold one known format, found {sorted(map(str, formats))}")
    system, rows = "", []
    for text in table.column("text").to_pylist():
        system, turn, response = split_text(text, fmt)
        rows.append((turn, response))
    held_out = eval_mask(table.column("id").cast("string"), CSV_EVAL_FRACTION)
    train = [row for row, out in zip(rows, held_out, strict=True) if not out]
    evaluation = [row for row, out in zip(rows, held_out, strict=True) if out]
    all_scores = table.column(SCORE).to_pylist() if SCORE in table.column_names else [None] * len(rows)
    scores = [score for score, out in zip(all_scores, held_out, strict=True) if not out]
    return LoadedDataset(path, {"dataset_id": path.stem, "format": fmt}, fmt, system, train, evaluation, scores)


def split_text(text: str, fmt_name: str) -> tuple[str, str, str]:
    """(system prompt, user turn, response) of a rendered text; the inverse of ``render_turns``."""
    fmt = FORMATS[fmt_name]
    if not text.endswith(fmt.end_of_turn) or fmt.assistant_open not in text:
        raise InputError(f"text is not in {fmt_name} format: {text[:80]!r}")
    body, response = text[: -len(fmt.end_of_turn)].rsplit(fmt.assistant_open, 1)
    system = ""
    if fmt.system_open is not None and body.startswith(fmt.system_open) and fmt.user_open in body:
        system, body = body[len(fmt.system_open) :].split(fmt.user_open, 1)
    else:
        bare, _ = prompt_prefix(fmt, "")
        body = body.removeprefix(bare)
    return system, body, response


def _turns(messages: list[dict[str, str]]) -> tuple[str, str]:
    by_role = {m["role"]: m["content"] for m in messages}
    return by_role["user"], by_role["assistant"]


def end_of_turn_id(tokenizer: Any, fmt_name: str) -> int:
    """The token that ends a response: the format's marker if it is one token, else EOS."""
    marker = FORMATS[fmt_name].end_of_turn
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer has neither a single token for {marker!r} nor an EOS token")
    return tokenizer.eos_token_id


def tokenize(tokenizer: Any, fmt_name: str, system: str, turn: str, response: str, max_len: int) -> Example:
    """One example: ids of the full text, labels only on the completion, end-of-turn learnt."""
    fmt = FORMATS[fmt_name]
    prompt, completion = render_turns(fmt, system, turn, response)
    body = prompt + completion[: -len(fmt.end_of_turn)]
    encoded = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    boundary = len(prompt)
    labels = [tok if end > boundary else IGNORE for tok, (_, end) in zip(ids, encoded["offset_mapping"], strict=True)]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    eot = end_of_turn_id(tokenizer, fmt_name)
    ids, labels = [*ids[: max_len - 1], eot], [*labels[: max_len - 1], eot]
    return Example(ids, labels)


def tokenize_all(
    tokenizer: Any, data: LoadedDataset, split: str, max_len: int, limit: int | None = None
) -> list[Example]:
    rows = (data.train if split == "train" else data.eval)[:limit]
    return [tokenize(tokenizer, data.format, data.system, turn, response, max_len) for turn, response in rows]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_factor: int = 64
) -> list[list[int]]:
    """Batches of similar length, in a random order that depends only on (seed, epoch).

    Examples are shuffled, cut into groups of ``group_factor`` batches, sorted by length
    within a group and batched; the batches are shuffled again. Padding then stays small
    while every epoch still sees a different mix.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_factor
    batches = []
    for start in range(0, len(order), group):
        members = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to ``multiple``: on a GPU, few distinct shapes (see ``loop.CUDA_PAD_MULTIPLE``)."""
    return -(-longest // multiple) * multiple


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]], multiple: int = 1) -> float:
    """Share of the padded token grid that is padding."""
    grid = sum(padded_width(max(lengths[i] for i in batch), multiple) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / grid if grid else 0.0


def collate(examples: Sequence[Example], pad_id: int, multiple: int = 1) -> dict[str, list[list[int]]]:
    """Right-padded lists; the caller turns them into tensors on its device."""
    width = padded_width(max(len(e) for e in examples), multiple)
    return {
        "input_ids": [e.input_ids + [pad_id] * (width - len(e)) for e in examples],
        "labels": [e.labels + [IGNORE] * (width - len(e)) for e in examples],
        "attention_mask": [[1] * len(e) + [0] * (width - len(e)) for e in examples],
    }
