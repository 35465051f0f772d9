"""The champion's serving directory: one stable path that always holds what the champion serves.

``<data_root>/models/<pipeline>/serving/`` holds the champion run's ``adapter/``, its
``gguf/``, ``merged/`` and Modelfiles when exported, and ``RUN`` (its id). A vLLM server
started with ``--lora-modules saige=<serving>/adapter``, or ``ollama create -f
<serving>/Modelfile``, serves the champion. It is replaced whole on each change (files are
hard links into the run directory where the volume allows, so it costs no space).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from saige_k8s.evaluation.champion import CHAMPION, ChampionStore
from saige_k8s.training import atomic

SERVING: Final = "serving"
RUN: Final = "RUN"
#: What a run directory may hold that a server reads.
SERVED: Final = ("adapter", "gguf", "merged", "Modelfile", "Modelfile.adapter")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def publish(data_root: Path, pipeline: str) -> Path | None:
    """Make ``serving/`` hold the current champion's files; None when the pipeline has no champion."""
    store = ChampionStore(data_root, pipeline)
    run_id = store.champion()
    if run_id is None:
        return None
    run_dir = data_root / "runs" / run_id
    target = store.directory / SERVING
    atomic.remove_stale(store.directory, {SERVING})
    with atomic.writing(target), atomic.replacing_dir(target) as tmp:
        for name in SERVED:
            source = run_dir / name
            if source.is_dir():
                shutil.copytree(source, tmp / name, copy_function=_link_or_copy)
            elif source.is_file():
                _link_or_copy(str(source), str(tmp / name))
        (tmp / RUN).write_text(f"{run_id}\n", encoding="utf-8")
    return target


def publish_if_champion(run_dir: Path) -> Path | None:
    """After an export: refresh the serving directory of each pipeline whose champion is this run."""
    data_root = run_dir.parent.parent
    published = None
    for pointer in sorted((data_root / "models").glob(f"*/{CHAMPION}")):
        if pointer.read_text(encoding="utf-8").strip() == run_dir.name:
            published = publish(data_root, pointer.parent.name)
    return published
