"""The embedding store: ``DIR/index.duckdb`` (what is there) + ``DIR/embeddings.zarr/`` (the vectors).

Connections are short-lived, one per operation, so a notebook holding a :class:`Store`
never locks out a CLI command on the same directory. Reads go through a read-only
connection; every change goes through :meth:`Store.transaction`, so a failing command
leaves the index exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import zarr

from .. import __version__
from ..errors import UserError
from . import arrays
from .schema import COHORT_VIEW, DDL, SCHEMA_VERSION

INDEX = "index.duckdb"
EMBEDDINGS = "embeddings.zarr"
ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}
# Columns of ``provenance`` in table order; write rows by name (insert_provenance), never by position.
PROVENANCE_COLUMNS = ("backbone", "dataset", "array_path", "n_cells", "dim", "dtype", "chunk_rows",
                      "scdrugmap_version", "checkpoint_sha256", "source_sha256", "params", "created_at", "origin")
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path) -> bool:
    """True for 's3://...', 'https://...' and other fsspec URLs (a 'file://' URL is a local path)."""
    m = _URL_RE.match(path) if isinstance(path, str) else None
    return bool(m) and m.group(1).lower() != "file"


def local_path(path) -> Path:
    """``path`` as a local Path ('file://' stripped)."""
    if isinstance(path, str) and path.lower().startswith("file://"):
        path = path[len("file://"):]
    return Path(path)


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
    new array is removed, so nothing half-registered remains. Returns whether one was replaced."""
    import shutil

    row = {**row, "array_path": rel}
    try:
        with store.transaction() as con:
            old = con.execute("SELECT array_path FROM provenance WHERE backbone = ? AND dataset = ?",
                              [row["backbone"], row["dataset"]]).fetchone()
            con.execute("DELETE FROM provenance WHERE backbone = ? AND dataset = ?", [row["backbone"], row["dataset"]])
            insert_provenance(con, row)
    except BaseException:
        shutil.rmtree(store.embeddings_path / rel, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(store.embeddings_path / old[0], ignore_errors=True)
    return bool(old)


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def check_select(query: str, what: str = "query") -> None:
    """Refuse anything but one read-only statement, before it reaches the database."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL syntax error in {what}: {_first_line(e)}") from None
    if not statements:
        raise UserError(f"the {what} is empty: give a SELECT statement")
    if len(statements) > 1:
        raise UserError(f"the {what} holds {len(statements)} statements: give exactly one SELECT")
    kind = statements[0].type.name
    if kind not in ALLOWED_STATEMENTS:
        raise UserError(f"the {what} is a {kind} statement: the store is read-only here, only SELECT is allowed")


def _mb(n: int) -> str:
    return f"{n:,} B" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split("\n")[:1]).strip()
    return text or type(err).__name__


class Store:
    """A directory holding one scdrugmap store.

    >>> store = Store.open("runs/store")                        # doctest: +SKIP
    >>> store.sql("SELECT dataset, n_cells FROM datasets")      # doctest: +SKIP
    >>> X, cells = store.load("pca", where="cancer_type = 'Lung cancer'")  # doctest: +SKIP
    """

    read_only = False      # True for stores opened by URL (scdrugmap.store.remote)

    def __init__(self, path):
        self.path = Path(path)
        self.index_path = self.path / INDEX
        self.embeddings_path = self.path / EMBEDDINGS
        self.io = arrays.IOStats()
        self.migrated: list = []          # schema migrations applied when this store was opened

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
        A store of an older schema version is migrated; a newer one is refused.
        """
        if is_url(path):
            from .remote import RemoteStore

            return RemoteStore.open_url(path, storage_options=storage_options, cache_dir=cache_dir)
        path = local_path(path)
        store = cls(path)
        if not path.exists():
            raise UserError(f"store {path} does not exist: create it with 'scdrugmap ingest ... --store {path}'")
        if not path.is_dir() or not store.index_path.is_file():
            raise UserError(f"{path} is not a scdrugmap store (no {INDEX}): point --store at a store directory")
        store._check_schema()
        return store

    def _check_schema(self) -> None:
        """Refuse a newer schema; migrate an older one (in place: the index file is local)."""
        from . import migrations

        version = self._schema_version()
        migrations.check_version(version, f"store {self.location}")
        if version < SCHEMA_VERSION:
            self.migrated = migrations.migrate(self.index_path, version, self.location)

    def require_writable(self, action: str) -> None:
        """A clear error when ``action`` would write to a read-only (URL) store."""

    def io_summary(self) -> str:
        """One line: the bytes this Store has read (``--verbose`` prints it)."""
        io = self.io
        parts = []
        if self.read_only:
            size = getattr(self, "index_size", 0)
            parts.append(f"index {_mb(size)} (cached copy, nothing transferred)" if io.index_cached
                         else f"index {_mb(io.index_bytes)} downloaded")
        parts.append(f"embeddings {_mb(io.chunk_bytes)} in {io.requests:,} objects")
        return f"bytes read from {self.location}: {_mb(io.total)} ({', '.join(parts)})"

    def array_nbytes(self, rel: str) -> int | None:
        """Bytes of one embedding array on disk."""
        root = self.embeddings_path / rel
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else None

    @classmethod
    def create(cls, path) -> "Store":
        """Create an empty store at ``path`` (an absent or empty directory)."""
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
        except BaseException:
            import shutil
            shutil.rmtree(path, ignore_errors=True)
            raise
        return store

    @classmethod
    def open_or_create(cls, path) -> "Store":
        if is_url(path):
            raise UserError(f"{path} is a URL: stores opened by URL are read-only, create a store in a local "
                            "directory")
        path = local_path(path)
        if path.exists() and (path / INDEX).exists():
            return cls.open(path)
        return cls.create(path)

    def _schema_version(self) -> int:
        try:
            with self.connect() as con:
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except duckdb.Error:
            raise UserError(f"{self.path} is not a scdrugmap store (unreadable index): "
                            "point --store at a store directory") from None
        if row is None:
            raise UserError(f"{self.location} is not a scdrugmap store (no schema version)")
        return int(row[0])

    # ---- connections ---------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, read_only: bool = True):
        try:
            con = duckdb.connect(str(self.index_path), read_only=read_only)
        except duckdb.IOException as e:
            raise UserError(f"cannot open {self.index_path}: {_first_line(e)} "
                            "(is another scdrugmap command writing to this store?)") from None
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self):
        """A read-write connection whose changes are committed together or not at all."""
        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---- SQL -----------------------------------------------------------------------------
    def sql(self, query: str, params=None) -> pd.DataFrame:
        """Run one read-only SELECT against the index and return a DataFrame."""
        check_select(query)
        with self.connect() as con:
            try:
                return con.execute(query, params).df() if params else con.execute(query).df()
            except duckdb.Error as e:
                raise UserError(f"SQL error: {_first_line(e)}") from None

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

    def cells(self, where: str | None = None, datasets=None) -> pd.DataFrame:
        """Cells of the ``cohort`` view matching ``where`` (SQL), in store order (dataset, row)."""
        query = "SELECT * FROM cohort"
        clauses = []
        if where:
            clauses.append(f"({where})")
        if datasets:
            clauses.append("dataset IN (" + ", ".join("'" + d.replace("'", "''") + "'" for d in datasets) + ")")
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += ' ORDER BY dataset, "row"'
        check_select(query, what="--where clause")
        with self.connect() as con:
            try:
                frame = con.execute(query).df()
            except duckdb.Error as e:
                raise UserError(f"invalid --where {where!r}: {_first_line(e)}") from None
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

        root = arrays.CountingStore(LocalStore(str(self.embeddings_path), read_only=True), self.io)
        return zarr.open_array(store=root, path=rel, mode="r", zarr_format=3)

    def load(self, backbone: str, where: str | None = None, datasets=None,
             dtype=None) -> tuple[np.ndarray, pd.DataFrame]:
        """Embeddings of the selected cells, row-aligned with the returned cells frame.

        Only the chunks holding selected rows are read.
        """
        cells = self.cells(where, datasets)
        prov = self.provenance(backbone)
        if prov.empty:
            have = self.extracted_backbones()
            raise UserError(f"backbone {backbone!r} has no embeddings in this store "
                            f"(extracted: {', '.join(have) or 'none'}): run 'scdrugmap extract --backbone {backbone}'")
        prov = prov.set_index("dataset")
        missing = sorted(set(cells["dataset"]) - set(prov.index))
        if missing:
            raise UserError(f"backbone {backbone!r} is not extracted for dataset(s) {', '.join(missing)}: "
                            f"run 'scdrugmap extract --backbone {backbone} --dataset {missing[0]}'")
        dims = {int(prov.loc[d, "dim"]) for d in cells["dataset"].unique()}
        if len(dims) > 1:
            raise UserError(f"backbone {backbone!r} has different dims across the selected datasets {sorted(dims)}: "
                            "re-extract them with the same parameters (--force)")
        spaces = {json.loads(prov.loc[d, "params"]).get("space_id") for d in cells["dataset"].unique()}
        if len(spaces) > 1:
            raise UserError(f"backbone {backbone!r} embeddings of the selected datasets lie in different feature "
                            f"spaces {sorted(map(str, spaces))}: re-extract them together with --force")
        dim = dims.pop() if dims else 0
        stored = [np.dtype(prov.loc[d, "dtype"]) for d in cells["dataset"].unique()]
        out_dtype = np.dtype(dtype) if dtype else np.result_type(*stored)
        X = np.empty((len(cells), dim), dtype=out_dtype)
        # cells come ordered by dataset: each dataset is one contiguous block of rows of X
        names = cells["dataset"].to_numpy()
        starts = np.r_[0, np.flatnonzero(names[1:] != names[:-1]) + 1]
        bounds = {names[lo]: (lo, hi) for lo, hi in zip(starts, np.r_[starts[1:], len(names)])}
        rows = cells["row"].to_numpy()

        def read(dataset):
            lo, hi = bounds[dataset]
            arr = self.open_array(prov.loc[dataset, "array_path"])
            arrays.read_rows(arr, rows[lo:hi], out=X[lo:hi])

        # datasets are read concurrently (decoding releases the GIL); each fills its own rows
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(read, bounds))
        return X, cells.reset_index(drop=True)

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
