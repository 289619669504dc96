"""The embedding store: ``DIR/index.duckdb`` (what is there) + ``DIR/embeddings.zarr/`` (the vectors).

Connections are short-lived, one per operation, so a notebook holding a :class:`Store`
never locks out a CLI command on the same directory. Reads go through a read-only
connection; every change goes through :meth:`Store.transaction`, so a failing command
leaves the index exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from .. import __version__
from ..errors import UserError
from . import arrays
from .schema import COHORT_VIEW, DDL, SCHEMA_VERSION

INDEX = "index.duckdb"
EMBEDDINGS = "embeddings.zarr"
ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}


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


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split("\n")[:1]).strip()
    return text or type(err).__name__


class Store:
    """A directory holding one scdrugmap store.

    >>> store = Store.open("runs/store")                        # doctest: +SKIP
    >>> store.sql("SELECT dataset, n_cells FROM datasets")      # doctest: +SKIP
    >>> X, cells = store.load("pca", where="cancer_type = 'Lung cancer'")  # doctest: +SKIP
    """

    def __init__(self, path):
        self.path = Path(path)
        self.index_path = self.path / INDEX
        self.embeddings_path = self.path / EMBEDDINGS

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "Store":
        """Open an existing store; a clear error if ``path`` is not one."""
        path = Path(path)
        store = cls(path)
        if not path.exists():
            raise UserError(f"store {path} does not exist: create it with 'scdrugmap ingest ... --store {path}'")
        if not path.is_dir() or not store.index_path.is_file():
            raise UserError(f"{path} is not a scdrugmap store (no {INDEX}): point --store at a store directory")
        version = store._schema_version()
        if version > SCHEMA_VERSION:
            raise UserError(
                f"store {path} has schema version {version}, newer than this scdrugmap's {SCHEMA_VERSION}: "
                "upgrade scdrugmap")
        return store

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
        path = Path(path)
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
            raise UserError(f"{self.path} is not a scdrugmap store (no schema version)")
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
            arr = arrays.open_array(self.embeddings_path, prov.loc[dataset, "array_path"])
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
                obs[col] = obs[col].astype("string").astype(object).where(obs[col].notna(), None)
        adata = ad.AnnData(obs=obs)
        adata.obsm[f"X_{backbone}"] = X
        adata.uns["scdrugmap"] = {"backbone": backbone, "where": where or "",
                                  "provenance": json.loads(self.provenance(backbone).to_json(orient="records",
                                                                                             date_format="iso"))}
        return adata
