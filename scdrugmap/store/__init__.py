"""The embedding store: a DuckDB index and Zarr arrays in one directory (docs/store-format.md)."""

from .ingest import IngestRequest, ingest
from .store import Store

__all__ = ["IngestRequest", "Store", "ingest"]
