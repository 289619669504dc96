"""The embedding store: a DuckDB index and Zarr arrays in one directory (docs/store-format.md)."""

from .exchange import export as export_embeddings
from .exchange import import_embeddings
from .ingest import IngestRequest, ingest
from .merge import merge as merge_stores
from .pack import pack as pack_store
from .pack import unpack as unpack_store
from .pack import verify as verify_pack
from .store import Store

__all__ = ["IngestRequest", "Store", "export_embeddings", "import_embeddings", "ingest", "merge_stores",
           "pack_store", "unpack_store", "verify_pack"]
