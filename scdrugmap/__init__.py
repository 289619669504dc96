"""scdrugmap: single-cell drug-response prediction with foundation-model embeddings."""

from ._version import __version__
from .errors import UserError

__all__ = ["Store", "UserError", "__version__"]


def __getattr__(name):
    # Store on first use: 'scdrugmap --help' and 'import scdrugmap' stay fast (no DuckDB, pandas, Zarr)
    if name == "Store":
        from .store.store import Store

        return Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
