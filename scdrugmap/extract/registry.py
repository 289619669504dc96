"""Backbone registry: a name maps to a :class:`Backbone` subclass.

Adding a backbone is adding one module to ``scdrugmap/extract/backbones/`` that defines a
subclass decorated with :func:`register`; nothing else changes. Third-party packages
register through the ``scdrugmap.backbones`` entry-point group, and the environment
variable ``SCDRUGMAP_PLUGINS`` (comma-separated module names) loads extra modules.

Backbone modules must import heavy frameworks (torch, transformers) inside methods, never
at module level, so that the registry loads on the core install (no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, ClassVar

import numpy as np
import scipy.sparse as sp

from ..errors import UserError

_REGISTRY: dict[str, type["Backbone"]] = {}
_LOADED = False


@dataclass
class Option:
    """A backbone parameter settable with ``--option NAME=VALUE``; recorded in provenance."""

    default: object
    help: str
    type: Callable = str
    min: float | None = None          # smallest allowed value of a number

    def parse(self, name: str, text: str):
        try:
            if self.type is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            value = self.type(text)
        except ValueError:
            raise UserError(f"--option {name}={text!r}: expected a {self.type.__name__}") from None
        return self.check(name, value)

    def check(self, name: str, value):
        if self.min is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value < self.min:
            raise UserError(f"--option {name}={value}: must be at least {self.min:g}")
        return value


def _which(names, one: str, many: str) -> str:
    if len(names) == 1:
        return f"dataset {names[0]!r} {one}"
    return f"datasets {', '.join(map(repr, names))} {many}"


class Backbone:
    """One frozen model (or baseline) that turns a dataset's cells into embeddings.

    Lifecycle per ``scdrugmap extract`` call: ``__init__`` (load the model) ->
    :meth:`prepare` (whole-cohort work, e.g. fitting PCA) -> for each dataset
    :meth:`encoder` returns a function mapping a CSR block of cells x source genes to an
    ``(n_cells, dim)`` float array, and the runner asks :meth:`embed_rows` for each store chunk.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_weights: ClassVar[bool] = False      # --model-dir required
    # The value kinds (datasets.value_kind) it reads, and what it needs in words; a dataset of
    # another kind is refused by :meth:`check_values` with one line, before anything is read.
    value_kinds: ClassVar[tuple[str, ...]] = ("counts",)
    values_needed: ClassVar[str] = "raw counts"
    needs_counts: ClassVar[bool] = True        # derived from value_kinds (kept for callers that ask)
    requires: ClassVar[tuple[str, ...]] = ()   # importable modules it needs (e.g. "torch")
    extra: ClassVar[str | None] = None         # pip extra that installs them
    options: ClassVar[dict[str, Option]] = {}
    # The cells of one forward pass attend to each other (CellPLM): which cells share a pass is
    # part of the embedding, so a comparison of two runs must give both the same groups.
    cells_attend: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "needs_counts" in cls.__dict__ and "value_kinds" not in cls.__dict__ and not cls.needs_counts:
            cls.value_kinds = ("counts", "normalized", "log1p")     # declared the older way
        cls.needs_counts = tuple(cls.value_kinds) == ("counts",)

    @classmethod
    def check_values(cls, rows) -> None:
        """Refuse (one line) datasets whose values this backbone does not read. ``rows`` are
        dataset rows (dicts with ``dataset`` and ``value_kind``), or objects with ``row``."""
        rows = [getattr(r, "row", r) for r in rows]
        empty = [r["dataset"] for r in rows if r["value_kind"] == "none"]
        if empty:
            raise UserError(f"backbone {cls.name!r} needs expression, but {_which(empty, 'has', 'have')} none "
                            "(embeddings-only): bring the embeddings with 'scdrugmap import-embeddings'")
        bad = [r for r in rows if r["value_kind"] not in cls.value_kinds]
        if bad:
            kinds = "/".join(sorted({r["value_kind"] for r in bad}))
            raise UserError(f"backbone {cls.name!r} needs {cls.values_needed}, but "
                            f"{_which([r['dataset'] for r in bad], 'holds', 'hold')} {kinds} values: "
                            "re-ingest with --replace from the raw counts "
                            "(--layer counts or --use-raw), or use the hvg or pca baselines")

    def __init__(self, model_dir=None, device: str = "cpu", batch_size: int | None = None,
                 options: dict | None = None):
        if self.needs_weights and model_dir is None:
            raise UserError(f"backbone {self.name!r} needs weights: pass --model-dir pointing at its checkpoint")
        self.model_dir = model_dir
        self.device = device
        self.batch_size = batch_size
        self.config = self.parse_options(options or {})

    @classmethod
    def parse_options(cls, given: dict) -> dict:
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            known = ", ".join(cls.options) or "none"
            raise UserError(f"unknown option(s) {', '.join(unknown)} for backbone {cls.name!r} (known: {known})")
        out = {}
        for key, opt in cls.options.items():
            value = given.get(key, opt.default)
            out[key] = opt.parse(key, value) if isinstance(value, str) and opt.type is not str else \
                opt.check(key, value)
        return out

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            how = f"pip install 'scdrugmap[{cls.extra}]'" if cls.extra else f"pip install {' '.join(missing)}"
            return False, f"needs {', '.join(missing)}: {how}"
        return True, "ready" if not cls.needs_weights else "ready (needs --model-dir)"

    @classmethod
    def dim_hint(cls) -> str:
        """The embedding dimension as shown by ``scdrugmap backbones`` (may depend on the checkpoint)."""
        return str(getattr(cls, "default_dim", "?"))

    # -- called by the runner ------------------------------------------------------------
    def prepare(self, store, sources: list) -> None:
        """Whole-cohort work before any dataset is embedded (default: nothing)."""

    def undo_prepare(self, store) -> None:
        """Remove what :meth:`prepare` saved in ``store`` if no stored embedding uses it (called when
        the disk refused a write, so that the failed command leaves the store as it was)."""

    def check_chunk_rows(self, chunk_rows: int) -> None:
        """Refuse (one line) a ``--chunk-rows`` that this backbone's settings cannot honour; called
        before any dataset is read (default: any is fine)."""

    def encoder(self, source) -> Callable[[sp.csr_matrix], np.ndarray]:
        raise NotImplementedError

    def embed_rows(self, source, encode, lo: int, hi: int) -> np.ndarray:
        """The embeddings of the dataset's store rows ``lo`` to ``hi - 1`` (one store chunk), with
        ``encode``, what :meth:`encoder` returned for ``source``. The runner calls it for each chunk
        it computes. Default: read those rows and encode them. A backbone whose cells depend on
        other cells (:attr:`cells_attend`) overrides it to read whatever rows it needs, so that its
        embeddings do not depend on the chunk size or on which process computes a chunk."""
        return encode(source.rows(lo, hi))

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def dataset_params(self, source) -> dict:
        """Per-dataset facts worth keeping in provenance (e.g. how many genes matched)."""
        return {}

    def params(self) -> dict:
        """Every parameter that determines the embedding; stored as provenance."""
        return dict(self.config)

    def checkpoint_sha256(self) -> str | None:
        return None


def register(cls: type[Backbone]) -> type[Backbone]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"backbone name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import backbones

    for mod in pkgutil.iter_modules(backbones.__path__):
        importlib.import_module(f"{backbones.__name__}.{mod.name}")
    for ep in entry_points(group="scdrugmap.backbones"):
        ep.load()
    for name in filter(None, (m.strip() for m in os.environ.get("SCDRUGMAP_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"SCDRUGMAP_PLUGINS names module {name!r}, which cannot be imported: {e}") from None


def get(name: str) -> type[Backbone]:
    _load_all()
    if name not in _REGISTRY:
        raise UserError(f"unknown backbone {name!r}: known backbones are {', '.join(sorted(_REGISTRY))} "
                        "(see 'scdrugmap backbones')")
    return _REGISTRY[name]


def all_backbones() -> dict[str, type[Backbone]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))
