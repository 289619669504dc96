"""Heads trained on stored embeddings, under pooled and cross-dataset protocols (CPU only)."""

from .run import ProbeRun, leaderboard, run_probe

__all__ = ["ProbeRun", "leaderboard", "run_probe"]
