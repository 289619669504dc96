"""The embedding store: ``DIR/index.duckdb`` (what is there) + ``DIR/embeddings.zarr/`` (the vectors).

Connections are short-lived, one per operation, so a notebook holding a :class:`Store`
never locks out a CLI command on the same directory, and a command that finds the index
busy waits for it (:mod:`.locks`). Reads go through a read-only connection that cannot reach
the file system (:mod:`.sql`); every change goes through :meth:`Store.transaction`, so a
failing command, a full disk included, leaves the index exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from importlib import import_module
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from . import arrays, migrations
from .common import EMBEDDINGS, INDEX, DiskError, disk_errno, first_line, is_url, local_path, mb, now
from .locks import wait_for_index
from .schema import COHORT_VIEW, DDL, SCHEMA_VERSION
from .sql import READ_CONFIG, check_condition, check_select, embed

__all__ = ["Store", "check_select", "commit_array", "commit_staged", "insert_provenance", "is_url", "local_path",
           "now", "INDEX", "EMBEDDINGS"]

# Columns of ``provenance`` in table order; write rows by name (insert_provenance), never by position.
PROVENANCE_COLUMNS = ("backbone", "dataset", "array_path", "n_cells", "dim", "dtype", "chunk_rows",
                      "scdrugmap_version", "checkpoint_sha256", "source_sha256", "params", "created_at", "origin")
# what DuckDB says when the index file itself is damaged (its blocks carry checksums)
_DAMAGE_WORDS = ("Corrupt database file", "not a valid DuckDB database file", "Could not read enough bytes",
                 "checksum", "database file is truncated")
# How stores given by URL are opened: modules that append an opener to URL_OPENERS when imported
# (a plugin hook, like the backbone registry's; this module never imports them by name).
URL_OPENER_MODULES = ("scdrugmap.store.remote",)
URL_OPENERS: list = []


def insert_provenance(con, row: dict) -> None:
    """Insert one provenance row by column name (``origin`` defaults to 'extracted')."""
    cols = [c for c in PROVENANCE_COLUMNS if c in row]
    unknown = set(row) - set(PROVENANCE_COLUMNS)
    if unknown:
        raise ValueError(f"unknown provenance columns {sorted(unknown)}")
    con.execute(f"INSERT INTO provenance ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[c] for c in cols])


def commit_array(store: "Store", rel: str, row: dict) -> bool:
    """Point the index at the finished array ``rel`` for ``row``'s backbone x dataset, in one
    transaction, replacing (and then deleting) any previous array; if the index write fails the
    new array is removed, so nothing half-registered remains. Returns whether one was replaced.

    Refused when the dataset was re-ingested (another source sha256) while the array was made."""
    row = {**row, "array_path": rel}
    try:
        with store.transaction() as con:
            current = con.execute("SELECT source_sha256 FROM datasets WHERE dataset = ?", [row["dataset"]]).fetchone()
            if current is None or current[0] != row["source_sha256"]:
                raise UserError(f"dataset {row['dataset']!r} was re-ingested or removed while its {row['backbone']} "
                                "embeddings were being made: run the command again")
            old = con.execute("SELECT array_path FROM provenance WHERE backbone = ? AND dataset = ?",
                              [row["backbone"], row["dataset"]]).fetchone()
            con.execute("DELETE FROM provenance WHERE backbone = ? AND dataset = ?", [row["backbone"], row["dataset"]])
            insert_provenance(con, row)
    except BaseException:
        shutil.rmtree(store.embeddings_path / rel, ignore_errors=True)
        raise
    if old and old[0] != rel:
        shutil.rmtree(store.embeddings_path / old[0], ignore_errors=True)
    return bool(old)


def embeddings_advice(backbone: str, datasets, prov: pd.DataFrame) -> str:
    """How to give ``backbone`` embeddings of ``datasets`` (None: of any dataset), for an error or
    a note: extract them if its embeddings were extracted here, import them if they were
    imported (``prov``: its provenance rows), either when the store has none of it yet."""
    which = f" --dataset {datasets[0]}" if datasets else ""
    more = " (once per dataset)" if datasets and len(datasets) > 1 else ""
    extract = f"'scdrugmap extract --backbone {backbone}{which}'"
    imported = f"'scdrugmap import-embeddings --backbone {backbone}{which or ' --dataset D'} --from FILE'"
    origins = set(prov["origin"]) if len(prov) else set()
    if "+lora:" in backbone:
        return ("these are the out-of-fold embeddings of one fine-tuning run, made for its cohort's datasets only: "
                "fine-tune again with --export-embeddings on a cohort that includes them")
    if origins == {"extracted"}:
        return f"run {extract}{more}"
    if origins == {"external"}:
        return f"import them with {imported}{more} (its embeddings here were imported)"
    return (f"run {extract}{more} for a backbone scdrugmap can run (see 'scdrugmap backbones'), or import "
            f"embeddings made elsewhere with {imported}{more}")


def commit_staged(store: "Store", staged: arrays.StagedArray, row: dict) -> bool:
    """Finish ``staged`` (unless an earlier run did), commit it (:func:`commit_array`), drop the staging."""
    old = commit_array(store, staged.finish(), row)
    staged.discard()
    return old


def _damaged(err: BaseException) -> bool:
    return isinstance(err, duckdb.Error) and any(w in str(err) for w in _DAMAGE_WORDS)


def _not_writable(path: Path) -> str | None:
    """Why the store directory cannot be written, or None when it can."""
    if os.access(path, os.W_OK) and (not (path / INDEX).exists() or os.access(path / INDEX, os.W_OK)):
        return None
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "no write permission"


class Store:
    """A directory holding one scdrugmap store.

    >>> store = Store.open("runs/store")                        # doctest: +SKIP
    >>> store.sql("SELECT dataset, n_cells FROM datasets")      # doctest: +SKIP
    >>> X, cells = store.load("pca", where="cancer_type = 'Lung cancer'")  # doctest: +SKIP
    """

    remote = False         # True for stores opened by URL (scdrugmap.store.remote)
    read_only = False      # True for URL stores and for directories this process cannot write

    def __init__(self, path):
        self.path = Path(path)
        self.index_path = self.path / INDEX
        self.embeddings_path = self.path / EMBEDDINGS
        self.io = arrays.IOStats()
        self.migrated: list = []          # schema migrations applied when this store was opened
        self.read_only_reason: str | None = None

    @property
    def location(self) -> str:
        """Where the store is, as the user named it (a directory or a URL)."""
        return str(self.path)

    @property
    def bytes_read(self) -> int:
        """Bytes read so far through this Store: the index download (URL stores) and embedding chunks."""
        return self.io.total

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path, storage_options: dict | None = None, cache_dir=None) -> "Store":
        """Open an existing store; a clear error if ``path`` is not one.

        ``path`` is a directory, or a URL ('s3://bucket/prefix', 'https://host/path', any
        fsspec URL): a URL store is read-only, its index is downloaded once into a local cache
        (``cache_dir``, default $SCDRUGMAP_CACHE_DIR or ~/.cache/scdrugmap) and only the
        embedding chunks of the selected rows are read (see :mod:`scdrugmap.store.remote`).
        ``storage_options`` go to fsspec (e.g. ``{"anon": True}`` or an ``endpoint_url``).
        A store of an older schema version is migrated; a newer one is refused. A directory
        this process cannot write opens read-only (``read_only``, ``read_only_reason``).
        """
        if is_url(path):
            if not URL_OPENERS:
                for module in URL_OPENER_MODULES:
                    import_module(module)
            return URL_OPENERS[0](path, storage_options=storage_options, cache_dir=cache_dir)
        path = local_path(path)
        store = cls(path)
        if not path.exists():
            raise UserError(f"store {path} does not exist: create it with 'scdrugmap ingest ... --store {path}'")
        if not path.is_dir() or not store.index_path.is_file():
            raise UserError(f"{path} is not a scdrugmap store (no {INDEX}): point --store at a store directory")
        store.read_only_reason = _not_writable(path)
        store.read_only = store.read_only_reason is not None
        store._check_schema()
        return store

    def _check_schema(self) -> None:
        """Refuse a newer schema; migrate an older one (in place: the index file is local)."""
        version = self._schema_version()
        migrations.check_version(version, f"store {self.location}")
        if version < SCHEMA_VERSION:
            self.migrated = migrations.migrate(self, version)

    def require_writable(self, action: str) -> None:
        """A clear error when ``action`` would write to a store this process cannot write."""
        if self.read_only:
            raise UserError(f"the store {self.location} is read-only ({self.read_only_reason}): {action} writes to "
                            "it; copy the store to a place you can write (or 'scdrugmap store pack' it and unpack "
                            "the pack there) and point --store at the copy")

    def io_summary(self) -> str:
        """One line: the bytes this Store has read (``--verbose`` prints it)."""
        io = self.io
        parts = []
        if self.remote:
            size = getattr(self, "index_size", 0)
            parts.append(f"index {mb(size)} (cached copy, nothing transferred)" if io.index_cached
                         else f"index {mb(io.index_bytes)} downloaded")
        parts.append(f"embeddings {mb(io.chunk_bytes)} in {io.requests:,} objects")
        return f"bytes read from {self.location}: {mb(io.total)} ({', '.join(parts)})"

    def array_nbytes(self, rel: str) -> int | None:
        """Bytes of one embedding array on disk."""
        root = self.embeddings_path / rel
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else None

    @classmethod
    def create(cls, path) -> "Store":
        """Create an empty store at ``path`` (an absent or empty directory).

        Used on a work folder that is then renamed into place (see :func:`.ingest.ingest`), so
        that a store appears complete or not at all."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} exists and is not a scdrugmap store: choose a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path)
        try:
            with duckdb.connect(str(store.index_path)) as con:
                for ddl in DDL:
                    con.execute(ddl)
                con.execute(COHORT_VIEW)
                con.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created_by", f"scdrugmap {__version__}"),
                    ("created_at", now().isoformat()),
                ])
            store.embeddings_path.mkdir(exist_ok=True)
        except BaseException as e:
            shutil.rmtree(path, ignore_errors=True)
            code = disk_errno(e)
            if code is not None:
                raise DiskError(code, path, "creating the store") from None
            raise
        return store

    def _schema_version(self) -> int:
        with self.connect() as con:
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except duckdb.CatalogException:
                raise UserError(f"{self.location} is not a scdrugmap store (its {INDEX} has no meta table): "
                                "point --store at a store directory") from None
        if row is None:
            raise UserError(f"{self.location} is not a scdrugmap store (no schema version)")
        return int(row[0])

    # ---- connections ---------------------------------------------------------------------
    def _index_error(self, err: BaseException) -> UserError:
        """The one-line error for an index that cannot be opened or read."""
        if _damaged(err):
            return UserError(f"the index of store {self.location} is damaged ({first_line(err)}): restore the store "
                             f"from its pack ('scdrugmap store unpack') or a backup; 'scdrugmap store verify "
                             f"{self.location}' checks the rest")
        code = disk_errno(err)
        if code is not None:
            return DiskError(code, self.index_path, "opening the index")
        return UserError(f"cannot open {self.index_path}: {first_line(err)}")

    @contextlib.contextmanager
    def connect(self, read_only: bool = True):
        """A connection to the index. Read-only ones cannot reach the file system (:mod:`.sql`);
        a busy index is waited for (:func:`.locks.wait_for_index`)."""
        def open_connection():
            return duckdb.connect(str(self.index_path), read_only=read_only,
                                  config=READ_CONFIG if read_only else {})

        try:
            con = wait_for_index(open_connection, self.location)
        except duckdb.Error as e:
            raise self._index_error(e) from None
        try:
            yield con
        except duckdb.Error as e:
            if _damaged(e):
                raise self._index_error(e) from None
            raise
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self):
        """A read-write connection whose changes are committed together or not at all.

        When the disk refuses the write (full, read-only) the change is rolled back, the empty
        write-ahead log DuckDB leaves is removed, and a :class:`~.common.DiskError` says why."""
        self.require_writable("writing to the index")
        with self.write_index() as con:
            yield con

    @contextlib.contextmanager
    def write_index(self):
        """:meth:`transaction` without the read-only check (migrating a URL store's local copy)."""
        wal = self.index_path.with_name(INDEX + ".wal")
        had_wal = wal.exists()
        try:
            with self.connect(read_only=False) as con:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        except BaseException as e:
            if not had_wal:
                with contextlib.suppress(OSError):
                    if wal.stat().st_size == 0:
                        wal.unlink()
            code = disk_errno(e)
            if code is not None and not isinstance(e, UserError):
                raise DiskError(code, self.index_path, "writing the index") from None
            raise

    # ---- SQL -----------------------------------------------------------------------------
    def _query_error(self, err: duckdb.Error, prefix: str) -> UserError:
        return self._index_error(err) if _damaged(err) else UserError(f"{prefix}: {first_line(err)}")

    def sql(self, query: str, params=None) -> pd.DataFrame:
        """Run one read-only SELECT against the index and return a DataFrame."""
        check_select(query)
        with self.connect() as con:
            try:
                return con.execute(query, params).df() if params else con.execute(query).df()
            except duckdb.Error as e:
                raise self._query_error(e, "SQL error") from None

    def datasets(self) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute("SELECT * FROM datasets ORDER BY dataset").df()

    def dataset_names(self) -> list[str]:
        return list(self.datasets()["dataset"])

    def require_datasets(self, names) -> list[str]:
        """``names`` if all are ingested (all datasets when empty); else a clear error."""
        known = self.dataset_names()
        if not names:
            if not known:
                raise UserError(f"store {self.path} has no datasets yet: run 'scdrugmap ingest' first")
            return known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"unknown dataset {', '.join(map(repr, unknown))}: "
                            f"this store has {', '.join(known) or 'none'}")
        return list(names)

    def cells(self, where: str | None = None, datasets=None, columns=None) -> pd.DataFrame:
        """Cells of the ``cohort`` view matching ``where`` (SQL), in store order (dataset, row).

        ``columns`` (names of the cohort view) keeps only those, plus ``dataset`` and ``row``:
        text columns cost most of the query (all 14 columns of 163,794 cells: 0.31 s; dataset
        and row alone: 0.04 s)."""
        query = f"SELECT {self._columns(columns)} FROM cohort"
        clauses, params = [], []
        if where:
            clauses.append(embed(check_condition(where, "cohort")))
        if datasets:
            clauses.append("list_contains(?, dataset)")
            params.append(list(datasets))
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += '\nORDER BY dataset, "row"'
        with self.connect() as con:
            try:
                frame = con.execute(query, params).df()
            except duckdb.Error as e:
                raise self._query_error(e, f"invalid --where {where!r}") from None
        if where and frame.empty:
            raise UserError(f"--where {where!r} matches no cells: check it with "
                            f"'scdrugmap query \"SELECT count(*) FROM cohort WHERE {where}\"'")
        return frame

    # ---- embeddings ----------------------------------------------------------------------
    def provenance(self, backbone: str | None = None) -> pd.DataFrame:
        with self.connect() as con:
            if backbone is None:
                return con.execute("SELECT * FROM provenance ORDER BY backbone, dataset").df()
            return con.execute("SELECT * FROM provenance WHERE backbone = ? ORDER BY dataset",
                               [backbone]).df()

    def extracted_backbones(self) -> list[str]:
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT backbone FROM provenance ORDER BY 1").fetchall()]

    def open_array(self, rel: str):
        """The embedding array at ``rel`` (a ``provenance.array_path``), read-only, its reads counted."""
        from zarr.storage import LocalStore

        if not (self.embeddings_path / rel / "zarr.json").is_file():
            raise arrays.ArrayMissing(rel)
        try:
            return arrays.open_counted(LocalStore(str(self.embeddings_path), read_only=True), self.io, rel)
        except (ValueError, TypeError, KeyError) as e:      # zarr.json unreadable
            raise UserError(f"embedding array {rel} is damaged (its zarr.json cannot be read: {first_line(e)}): "
                            "re-extract it (--force), or restore the store from its pack") from None

    def _columns(self, columns) -> str:
        if columns is None:
            return "*"
        with self.connect() as con:
            known = [r[0] for r in con.execute("SELECT * FROM cohort LIMIT 0").description]
        wanted = list(dict.fromkeys(["dataset", "row", *columns]))
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise UserError(f"unknown cohort column(s) {', '.join(map(repr, unknown))}: choose from {', '.join(known)}")
        return ", ".join('"' + c.replace('"', '""') + '"' for c in wanted)

    def load(self, backbone: str, where: str | None = None, datasets=None,
             dtype=None, columns=None) -> tuple[np.ndarray, pd.DataFrame]:
        """Embeddings of the selected cells, row-aligned with the returned cells frame (all the
        cohort view's columns, or ``columns`` plus ``dataset`` and ``row``).

        Only the chunks holding selected rows are read, and checked (checksums). An array
        replaced by a concurrent ``extract --force`` while it was read is read again from its
        successor; a damaged or missing chunk is a one-line error naming it.
        """
        cells = self.cells(where, datasets, columns)
        return self.load_rows(backbone, cells, dtype), cells.reset_index(drop=True)

    def load_rows(self, backbone: str, cells: pd.DataFrame, dtype=None) -> np.ndarray:
        """Embeddings of ``cells`` (a frame of :meth:`cells`, e.g. a subsample), in its order; the
        same checks, retry and one-line errors as :meth:`load`."""
        for attempt in range(3):
            prov = self._embedding_rows(backbone, cells)
            try:
                return self._read_embeddings(prov, cells, dtype)
            except (arrays.ArrayMissing, arrays.ChunkError) as e:
                again = self._embedding_rows(backbone, cells)
                if attempt == 2 or again["array_path"].equals(prov["array_path"]):
                    if isinstance(e, arrays.ArrayMissing):
                        raise UserError(f"embedding array {e.rel} of backbone {backbone!r} is missing from "
                                        f"{self.location}: the store is damaged; re-extract it (--force), or "
                                        "restore the store from its pack") from None
                    raise
        raise AssertionError("unreachable")

    def _embedding_rows(self, backbone: str, cells: pd.DataFrame) -> pd.DataFrame:
        """The provenance rows (indexed by dataset) of ``backbone`` for the datasets of ``cells``."""
        prov = self.provenance(backbone)
        if prov.empty:
            have = self.extracted_backbones()
            raise UserError(f"backbone {backbone!r} has no embeddings in this store (backbones with embeddings: "
                            f"{', '.join(have) or 'none'}): {embeddings_advice(backbone, None, prov)}")
        missing = sorted(set(cells["dataset"]) - set(prov["dataset"]))
        if missing:
            raise UserError(f"backbone {backbone!r} has no embeddings of dataset(s) {', '.join(missing)}: "
                            f"{embeddings_advice(backbone, missing, prov)}")
        prov = prov.set_index("dataset")
        prov = prov.loc[sorted(cells["dataset"].unique())]
        dims = set(prov["dim"].astype(int))
        if len(dims) > 1:
            raise UserError(f"backbone {backbone!r} has different dims across the selected datasets {sorted(dims)}: "
                            "re-extract them with the same parameters (--force)")
        spaces = {json.loads(p).get("space_id") for p in prov["params"]}
        if len(spaces) > 1:
            raise UserError(f"backbone {backbone!r} embeddings of the selected datasets lie in different feature "
                            f"spaces {sorted(map(str, spaces))}: re-extract them together with --force")
        return prov

    def _read_embeddings(self, prov: pd.DataFrame, cells: pd.DataFrame, dtype) -> np.ndarray:
        dim = int(prov["dim"].iloc[0]) if len(prov) else 0
        stored = [np.dtype(d) for d in prov["dtype"]]
        out_dtype = np.dtype(dtype) if dtype else np.result_type(*stored)
        X = np.empty((len(cells), dim), dtype=out_dtype)
        # cells come ordered by dataset: each dataset is one contiguous block of rows of X
        names = cells["dataset"].to_numpy()
        starts = np.r_[0, np.flatnonzero(names[1:] != names[:-1]) + 1] if len(names) else np.array([], int)
        bounds = {names[lo]: (lo, hi) for lo, hi in zip(starts, np.r_[starts[1:], len(names)])}
        rows = cells["row"].to_numpy()

        jobs = []
        for dataset, (lo, hi) in bounds.items():
            row = prov.loc[dataset]
            rel = row["array_path"]
            arr = self.open_array(rel)
            mismatch = arrays.layout_mismatch(arr, row)
            if mismatch:
                (shape, dtype, chunked), (want_shape, want_dtype, want_chunked) = mismatch
                raise UserError(f"embedding array {rel} is {shape} {dtype} in chunks of {chunked} rows where the index "
                                f"says {want_shape} {want_dtype} in chunks of {want_chunked}: its zarr.json is damaged; "
                                "re-extract it (--force), or restore the store from its pack")
            jobs.append((arr, rows[lo:hi], X[lo:hi], rel))
        # every chunk of every dataset is one task of the reader threads; each fills its own rows
        arrays.read_rows_many(jobs)
        return X

    def to_anndata(self, backbone: str, where: str | None = None, datasets=None):
        """An AnnData with the embedding in ``obsm['X_<backbone>']`` and the cells as ``obs``."""
        import anndata as ad

        X, cells = self.load(backbone, where, datasets)
        obs = cells.copy()
        obs.index = (obs["dataset"] + ":" + obs["obs_name"].astype(str)).to_numpy()
        obs.index.name = None
        for col in obs.columns:
            if obs[col].dtype == object:
                if obs[col].isna().all():       # h5ad cannot write an object column of nothing but None
                    obs[col] = pd.Categorical([None] * len(obs))
                else:
                    obs[col] = obs[col].astype("string").astype(object).where(obs[col].notna(), None)
        adata = ad.AnnData(obs=obs)
        adata.obsm[f"X_{backbone}"] = X
        # provenance as one JSON string (records with nulls cannot be written to .h5ad otherwise)
        prov = self.provenance(backbone)
        prov = prov[prov["dataset"].isin(set(cells["dataset"]))]
        adata.uns["scdrugmap"] = {"backbone": backbone, "where": where or "",
                                  "provenance": prov.to_json(orient="records", date_format="iso")}
        return adata
