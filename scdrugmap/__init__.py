"""scdrugmap: single-cell drug-response prediction with foundation-model embeddings."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .store import Store  # noqa: E402

__all__ = ["Store", "UserError", "__version__"]
