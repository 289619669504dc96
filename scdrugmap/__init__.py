"""scdrugmap: single-cell drug-response prediction with foundation-model embeddings."""

__version__ = "0.1.0"
