"""Deciding whether a retrained candidate replaces the champion.

The evaluator scores both models on the same items; this package turns those paired margins into
per-principle and per-component comparisons (``compare``), a promote/reject verdict under a stated
gate (``gate``), and the champion pointer with its history on the shared volume (``champion``).
Pure statistics and file handling: nothing here needs torch.
"""
