"""The extraction runner: every backbone, every dataset, chunk by chunk, resumable.

For each dataset the runner asks the backbone for the embeddings of each row chunk aligned
with the store's Zarr chunks (``Backbone.embed_rows``: by default the chunk's rows of the
verified source file, re-read and encoded; CellPLM reads the rows of the cell groups that
overlap the chunk), and writes each chunk through
:class:`~scdrugmap.store.arrays.StagedArray`. Only a fully written dataset is committed to
the index, with its provenance, in one transaction.

Under ``torchrun`` the processes share every dataset's chunks (see :mod:`.world`).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass

import numpy as np

from .._version import __version__
from ..errors import UserError
from ..progress import progress_bar
from ..store import arrays
from ..store import gene_ids
from ..store import source as src
from ..store.common import now
from ..store.cleanup import disk_rollback, reclaim
from ..store.common import DiskError
from ..store.locks import job_lock
from ..store.store import Store, commit_staged
from . import registry
from .world import World


DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
MAX_BATCH = 1 << 20              # cells per forward pass: more is a typo, not a setting
MAX_CHUNK_ROWS = 1 << 22


class DatasetSource:
    """An ingested dataset's source file, checked against its recorded sha256, read lazily."""

    def __init__(self, row: dict):
        self.row = row
        self.name = row["dataset"]
        self.path = src.verify_source(row)
        self.n_cells = int(row["n_cells"])
        self.value_kind = row["value_kind"]
        self._adata = None

    @property
    def adata(self):
        if self._adata is None:
            self._adata = src.open_h5ad(self.path)
        return self._adata

    def symbols(self, upper: bool = True) -> np.ndarray:
        return src.gene_symbols(self.adata, self.row, upper=upper)

    def ensembl_ids(self) -> np.ndarray | None:
        col = self.row.get("ensembl_col")
        var_names, var = src.var_of(self.adata, self.row.get("source_layer"))
        if self.row["gene_id_type"] == "ensembl":
            ids = np.asarray(var_names.astype(str))
        elif self.row["gene_id_type"] == "entrez" and not col:
            return gene_ids.entrez_ensembl(self.entrez_ids())
        elif col:
            ids = var[col].astype(str).to_numpy()
        else:
            return None
        return np.array([i.split(".")[0] for i in ids])

    def entrez_ids(self) -> np.ndarray | None:
        """NCBI Gene (Entrez) IDs of the genes, for a dataset ingested with them (else None)."""
        return src.entrez_ids(self.adata, self.row.get("source_layer")) if self.row["gene_id_type"] == "entrez" else None

    def rows(self, lo: int, hi: int):
        return src.rows_csr(src.matrix(self.adata, self.row.get("source_layer")), lo, hi)

    def obs_column(self, name: str):
        """The source file's obs column ``name`` as it is written there (a pandas Series), or None."""
        obs = self.adata.obs
        return obs[name] if name in obs.columns else None

    def close(self):
        if self._adata is not None:
            self._adata.file.close()
            self._adata = None


@dataclass
class ExtractReport:
    dataset: str
    status: str          # extracted | skipped | shard (a share computed by a rank other than 0)
    n_cells: int = 0
    dim: int = 0
    resumed_chunks: int = 0
    computed_chunks: int = 0
    rank: int = 0
    world_size: int = 1


def _sources(store: Store, names: list[str]) -> list[DatasetSource]:
    rows = store.datasets().set_index("dataset", drop=False)
    return [DatasetSource({k: (None if _isna(v) else v) for k, v in rows.loc[n].to_dict().items()}) for n in names]


def _isna(v) -> bool:
    try:
        return v is None or (isinstance(v, float) and np.isnan(v))
    except TypeError:
        return False


def extract(store: Store, backbone: str, datasets=None, model_dir=None, device: str = "cpu",
            batch_size: int | None = None, force: bool = False, dtype: str = "float16",
            options: dict | None = None, chunk_rows: int = arrays.DEFAULT_CHUNK_ROWS,
            show_progress: bool = True) -> list[ExtractReport]:
    """Embed ``datasets`` (all when None) with ``backbone`` into ``store``."""
    if dtype not in arrays.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(arrays.DTYPES)}")
    check_run_settings(device, batch_size, chunk_rows)
    store.require_writable("extract")
    cls = registry.get(backbone)
    ok, why = cls.availability()
    if not ok:
        raise UserError(f"backbone {backbone!r} cannot run here: {why}")
    cls.parse_options(options or {})            # a bad --option fails before anything is locked or read
    names = store.require_datasets(datasets)
    world = World.from_env()
    # One extraction of a backbone at a time (rank 0 holds the lock for all ranks of a torchrun job);
    # it also guards the backbone's arrays while leftovers of killed runs are cleaned up.
    lock = (job_lock(store.path, f"extract-{arrays.safe_name(backbone)}",
                     f"'scdrugmap extract --backbone {backbone}'") if world.main else contextlib.nullcontext())
    with lock:
        if world.main:
            reclaim(store, backbone)
        return _extract(store, cls, backbone, names, world, model_dir, device, batch_size, force, dtype, options,
                        chunk_rows, show_progress)


def check_run_settings(device: str, batch_size: int | None, chunk_rows: int) -> None:
    """--device, --batch-size and --chunk-rows as one-line errors (shared with fine-tuning)."""
    if not DEVICE_RE.match(str(device)):
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps")
    if batch_size is not None and not 1 <= batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size {batch_size} is out of range: give 1 to {MAX_BATCH:,} cells per forward pass")
    if not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
        raise UserError(f"--chunk-rows {chunk_rows} is out of range: give 1 to {MAX_CHUNK_ROWS:,} rows")


def _extract(store, cls, backbone, names, world, model_dir, device, batch_size, force, dtype, options, chunk_rows,
             show_progress) -> list[ExtractReport]:
    done = set(store.provenance(backbone)["dataset"])
    todo = [n for n in names if force or n not in done]
    reports = [ExtractReport(n, "skipped", rank=world.rank, world_size=world.size) for n in names if n not in todo]
    if not todo:
        return reports
    rows = store.datasets().set_index("dataset", drop=False)
    cls.check_values([rows.loc[n].to_dict() for n in todo])     # before any source file is opened
    sources = _sources(store, todo)
    with world.joined():
        model = cls(model_dir=model_dir, device=world.device(device), batch_size=batch_size, options=options)
        try:
            model.check_chunk_rows(chunk_rows)
            # Encoders first: they check every dataset (gene overlap, ...) before anything is written.
            encoders = {source.name: model.encoder(source) for source in sources}
            # Rank 0 does (and saves) the whole-cohort work; the others then find it done.
            for turn in (True, False):
                if world.main == turn:
                    model.prepare(store, sources)
                world.barrier()
            try:
                for source in sources:
                    reports.append(_extract_one(store, model, source, encoders[source.name], dtype, chunk_rows,
                                                show_progress and world.main, world))
            except DiskError:
                if world.main:
                    model.undo_prepare(store)
                raise
        finally:
            for source in sources:
                source.close()
    order = {n: i for i, n in enumerate(names)}
    return sorted(reports, key=lambda r: order[r.dataset])


def _extract_one(store: Store, model: registry.Backbone, source: DatasetSource, encode, dtype: str,
                 chunk_rows: int, show_progress: bool, world: World = World()) -> ExtractReport:
    params = {**model.params(), **model.dataset_params(source)}
    job = {"params": params, "source_sha256": source.row["source_sha256"],
           "checkpoint_sha256": model.checkpoint_sha256()}

    def staging():
        return arrays.StagedArray(store.embeddings_path, model.name, source.name, source.n_cells, model.dim,
                                  dtype, chunk_rows, job)

    # Rank 0 creates (or resumes) the staging array before the others open it.
    staged = staging() if world.main else None
    world.barrier()
    staged = staged or staging()
    already = staged.done_chunks()
    mine = [i for i in world.share(staged.n_chunks) if i not in already]
    total = sum(min(chunk_rows, source.n_cells - i * chunk_rows) for i in world.share(staged.n_chunks))
    with progress_bar(f"{model.name} · {source.name}", total=total, enabled=show_progress) as advance, \
            disk_rollback(staged, store.embeddings_path, f"writing {model.name} embeddings of {source.name}"):
        for i in world.share(staged.n_chunks):
            lo, hi = staged.chunk_bounds(i)
            if i in mine:
                values = np.asarray(model.embed_rows(source, encode, lo, hi), dtype=np.float32)
                staged.write_chunk(i, values)
            advance(hi - lo)
    world.barrier()              # every share is written
    if not world.main:
        return ExtractReport(source.name, "shard", source.n_cells, model.dim, len(already), len(mine),
                             world.rank, world.size)
    commit_staged(store, staged, {
        "backbone": model.name, "dataset": source.name, "n_cells": source.n_cells,
        "dim": model.dim, "dtype": dtype, "chunk_rows": chunk_rows, "scdrugmap_version": __version__,
        "checkpoint_sha256": model.checkpoint_sha256(), "source_sha256": source.row["source_sha256"],
        "params": json.dumps(params, sort_keys=True, default=str), "created_at": now(), "origin": "extracted"})
    return ExtractReport(source.name, "extracted", source.n_cells, model.dim, len(already), len(mine),
                         world.rank, world.size)

