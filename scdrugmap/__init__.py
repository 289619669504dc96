"""scdrugmap: single-cell drug-response prediction with foundation-model embeddings."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

__all__ = ["Store", "UserError", "__version__"]


def __getattr__(name):
    # Store on first use: 'scdrugmap --help' and 'import scdrugmap' stay fast (no DuckDB, pandas, Zarr)
    if name == "Store":
        from .store.store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
