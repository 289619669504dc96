"""Frozen backbones and the runner that writes their embeddings into a store."""

from .registry import Backbone, Option, all_backbones, register
from .runner import extract

__all__ = ["Backbone", "Option", "all_backbones", "extract", "register"]
