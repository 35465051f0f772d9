"""The human-readable end of an extraction: the seed's statistics, the funnel, samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_CHARS = 240


def format_report(manifest: dict[str, Any], path: Path, csv_path: Path | None = None) -> str:
    counts = manifest["counts"]
    stats = manifest["stats"]
    harm = stats["actual_harm"]
    weighted = stats["buddhist_weighted_score"]
    mix = ", ".join(f"{ratio:.0%} {label}" for label, ratio in stats["alignment_ratio"].items() if ratio > 0)
    lines = [
        f"Found {counts['kept']} high-quality experiences (of {counts['scanned']} scanned)",
        f"Wrote {counts['kept']} training examples to {path} "
        f"(train {counts['train']}, eval {counts['eval']}, format {manifest['format']})",
    ]
    if csv_path is not None:
        lines.append(f"Wrote {counts['kept']} training examples to {csv_path}")
    lines += [
        "Training Data Statistics:",
        f"   Harm Score: avg={harm['avg']:.3f}, min={harm['min']:.3f}, max={harm['max']:.3f}",
        f"   Buddhist Score: avg={weighted['avg']:.2f}, min={weighted['min']:.2f}, max={weighted['max']:.2f}",
        f"   Alignment: {mix}",
        "   Principles: " + ", ".join(f"{p}={v:.2f}" for p, v in stats["principles"].items() if v is not None),
        "Funnel (rows removed at each step):",
        f"   {'scanned':<22}{counts['scanned']:>10}",
    ]
    lines += [f"   {step['step']:<22}{-step['removed']:>10}   -> {step['remaining']}" for step in manifest["funnel"]]
    invalid = {k: v for k, v in manifest["invalid"].items() if v}
    if invalid:
        lines.append("   unusable rows: " + ", ".join(f"{k}={v}" for k, v in invalid.items()))
    source = manifest["source_stats"]
    if source["mean_harm"] is not None:
        lines.append(
            f"All experiences: {source['rows']} rows, mean harm {source['mean_harm']:.3f}, "
            f"mean weighted score {source['mean_weighted_score']:.2f}, "
            f"{(source['alignment_ratio']['excellent'] or 0):.0%} excellent"
        )
    lines.append(f"Done in {manifest['duration_seconds']:.2f}s ({manifest['rows_per_second']:,.0f} rows/s)")
    lines.append("Samples:")
    for sample in stats["samples"]:
        lines.append(
            f"   [{sample['id']}] {sample['buddhist_alignment']}, harm {sample['actual_harm']:.3f}, "
            f"score {sample['buddhist_weighted_score']:.2f}"
        )
        lines.append(f"      user:      {_short(sample['user'])}")
        lines.append(f"      assistant: {_short(sample['response'])}")
    return "\n".join(lines)


def _short(text: str) -> str:
    flat = text.replace("\n", " ")
    return flat[:SAMPLE_CHARS] + ("..." if len(flat) > SAMPLE_CHARS else "")
