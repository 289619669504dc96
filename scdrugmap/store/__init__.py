"""The embedding store: a DuckDB index and Zarr arrays in one directory (docs/store-format.md).

The names below are imported on first use, so ``import scdrugmap.store.constants`` (what the
command line needs to show its help) stays free of numpy, pandas, DuckDB and Zarr.
"""

from importlib import import_module

_EXPORTS = {
    "IngestRequest": ("ingest", "IngestRequest"), "ingest": ("ingest", "ingest"),
    "Store": ("store", "Store"),
    "export_embeddings": ("exchange", "export"), "import_embeddings": ("exchange", "import_embeddings"),
    "merge_stores": ("merge", "merge"),
    "pack_store": ("pack", "pack"), "unpack_store": ("pack", "unpack"), "verify_pack": ("pack", "verify"),
    "verify_store": ("check", "verify_store"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
