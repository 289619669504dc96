"""Heads trained on stored embeddings, under pooled and cross-dataset protocols (CPU only)."""

from .leaderboard import leaderboard
from .run import ProbeRun, run_probe

__all__ = ["ProbeRun", "leaderboard", "run_probe"]
