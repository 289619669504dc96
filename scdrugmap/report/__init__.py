"""``scdrugmap report``: one self-contained HTML file of a store's results (figures embedded)."""

from .build import build_report

__all__ = ["build_report"]
