"""Embeddings in and out of a store: export to .h5ad / .parquet, import from .npy / .h5ad / .parquet.

* **Export**: AnnData with the embedding in ``obsm["X_<backbone>"]`` and the cells (the
  ``cohort`` view: labels, samples, patients, every obs column, dataset context) in ``obs``,
  indexed ``<dataset>:<obs_name>``; or Parquet with one row per cell, the same columns, and the
  embedding as one fixed-size list column ``X_<backbone>`` (float16 or float32, as stored).
  Both carry the provenance as JSON (``uns["scdrugmap"]`` / the Parquet schema metadata
  ``scdrugmap``).
* **Import**: embeddings computed elsewhere (another tool, a model's web API) become a
  backbone of the store, with ``provenance.origin = 'external'`` and the file's name,
  format, sha256 and key in ``params``. Rows are aligned to the ingested cells by cell name
  (``obs_name``); a file with another number of rows, unknown or repeated names is refused.
  Without names (a bare ``.npy``) the rows must be in store order (the order of the
  ingested ``.h5ad``), and the report says so. The array is written through the store's
  crash-safe writer, then registered in one transaction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from . import arrays
from .source import sha256_file
from .common import first_line as _first_line
from .common import check_writable_dir, disk_error_or, now
from .cleanup import disk_rollback, reclaim
from .locks import job_lock
from .store import Store, commit_staged

FORMATS = {".h5ad": "h5ad", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy"}
BACKBONE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:@-]{0,99}$")


def _format(path: Path, allowed) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind not in allowed:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r}: use "
                        + " or ".join(sorted({s for s, k in FORMATS.items() if k in allowed})))
    return kind


# ---- export --------------------------------------------------------------------------------
@dataclass
class ExportReport:
    path: Path
    format: str
    n_cells: int
    dim: int
    dtype: str
    n_bytes: int


def export(store: Store, backbone: str, to, where: str | None = None, overwrite: bool = False) -> ExportReport:
    """Write ``backbone``'s embeddings of the cells selected by ``where`` to ``to`` (.h5ad or .parquet)."""
    to = Path(to)
    kind = _format(to, ("h5ad", "parquet"))
    if to.exists() and not overwrite:
        raise UserError(f"{to} exists: choose another file or pass --force to replace it")
    check_writable_dir(to.parent, f"the export {to.name}")
    tmp = to.with_name(f".{to.name}.part")
    try:
        if kind == "h5ad":
            adata = store.to_anndata(backbone, where=where)
            X = adata.obsm[f"X_{backbone}"]
            adata.write_h5ad(tmp)
        else:
            X, cells = store.load(backbone, where=where)
            _write_parquet(store, backbone, where, X, cells, tmp)
        os.replace(tmp, to)
    except BaseException as e:
        raise disk_error_or(e, to, "writing the export")
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportReport(to, kind, X.shape[0], X.shape[1], str(X.dtype), to.stat().st_size)


def _write_parquet(store: Store, backbone: str, where, X: np.ndarray, cells: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(cells, preserve_index=False)
    values = pa.array(np.ascontiguousarray(X).reshape(-1))
    table = table.append_column(f"X_{backbone}", pa.FixedSizeListArray.from_arrays(values, X.shape[1]))
    prov = store.provenance(backbone)
    prov = prov[prov["dataset"].isin(set(cells["dataset"]))]
    meta = {"backbone": backbone, "where": where or "", "scdrugmap_version": __version__,
            "provenance": json.loads(prov.to_json(orient="records", date_format="iso"))}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"scdrugmap": json.dumps(meta).encode()})
    pq.write_table(table, path)


# ---- import --------------------------------------------------------------------------------
@dataclass
class ImportReport:
    backbone: str
    dataset: str
    n_cells: int
    dim: int
    dtype: str
    aligned_by: str          # 'cell names' | 'row order'
    reordered: bool          # the file's rows were not in store order
    replaced: bool


def _read_names(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"--cell-ids file {path} does not exist: give a text file with one cell name per line")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and names[-1] == "":
        names.pop()
    return np.array(names, dtype=object)


def _matrix(values, where: str) -> np.ndarray:
    X = np.asarray(values)
    if X.ndim != 2 or X.shape[1] == 0:
        raise UserError(f"{where} is not a 2-D matrix of cells x dimensions (shape {X.shape})")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise UserError(f"{where} holds {X.dtype} values, not numbers")
    return X


def _scdrugmap_rows(frame: pd.DataFrame, dataset: str, where: str):
    """Rows of an export by scdrugmap (columns dataset + obs_name): this dataset's rows and their names."""
    if not {"dataset", "obs_name"} <= set(frame.columns):
        return None
    mask = (frame["dataset"].astype(str) == dataset).to_numpy()
    if not mask.any():
        found = sorted(frame["dataset"].astype(str).unique())[:5]
        raise UserError(f"{where} has no rows of dataset {dataset!r} (its dataset column holds {', '.join(found)})")
    return mask, frame.loc[mask, "obs_name"].astype(str).to_numpy(dtype=object)


def _read_npy(path: Path):
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as .npy ({_first_line(e)})") from None
    return _matrix(X, str(path)), None, None


def _read_h5ad(path: Path, dataset: str, backbone: str, key: str | None, cell_col: str | None):
    from .source import open_h5ad

    adata = open_h5ad(path)
    try:
        keys = list(adata.obsm.keys())
        if key is None:
            key = f"X_{backbone}" if f"X_{backbone}" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise UserError(f"{path} has obsm keys {', '.join(keys) or 'none'}: name the embedding with --key")
        elif key not in keys:
            raise UserError(f"--key {key!r} is not an obsm key of {path}: it has {', '.join(keys) or 'none'}")
        X = adata.obsm[key]
        if hasattr(X, "toarray"):
            X = X.toarray()
        X = _matrix(X, f"obsm[{key!r}] of {path}")
        obs = adata.obs.copy()
        obs_names = np.asarray(adata.obs_names.astype(str), dtype=object)
    finally:
        adata.file.close()
    if cell_col is not None:
        if cell_col not in obs.columns:
            raise UserError(f"--cell-col {cell_col!r} is not an obs column of {path}: it has "
                            f"{', '.join(map(str, obs.columns)) or 'none'}")
        return X, obs[cell_col].astype(str).to_numpy(dtype=object), key
    ours = _scdrugmap_rows(obs, dataset, str(path))
    if ours is not None:
        mask, names = ours
        return X[mask], names, key
    return X, obs_names, key


def _read_parquet(path: Path, dataset: str, backbone: str, key: str | None, cell_col: str | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as Parquet ({_first_line(e)})") from None
    lists = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
             or pa.types.is_large_list(f.type)]
    if key is None:
        key = f"X_{backbone}" if f"X_{backbone}" in lists else (lists[0] if len(lists) == 1 else None)
        if key is None:
            raise UserError(f"{path} has list columns {', '.join(lists) or 'none'}: name the embedding column "
                            "with --key")
    elif key not in table.column_names:
        raise UserError(f"--key {key!r} is not a column of {path}: it has {', '.join(table.column_names)}")
    column = table.column(key).combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)
            or pa.types.is_large_list(column.type)):
        raise UserError(f"column {key!r} of {path} is not a list column (one embedding per row)")
    if column.null_count:
        raise UserError(f"column {key!r} of {path} has {column.null_count} empty rows")
    flat = column.flatten().to_numpy(zero_copy_only=False)
    lengths = np.unique(column.value_lengths().to_numpy(zero_copy_only=False)) \
        if not pa.types.is_fixed_size_list(column.type) else np.array([column.type.list_size])
    if len(lengths) != 1 or len(column) == 0:
        raise UserError(f"column {key!r} of {path} holds vectors of different lengths ({lengths[:5].tolist()})")
    X = _matrix(flat.reshape(len(column), int(lengths[0])), f"column {key!r} of {path}")
    others = [c for c in table.column_names if c != key]
    frame = table.select(others).to_pandas() if others else pd.DataFrame(index=range(len(column)))
    if cell_col is not None:
        if cell_col not in frame.columns:
            raise UserError(f"--cell-col {cell_col!r} is not a column of {path}: it has {', '.join(others) or 'none'}")
        return X, frame[cell_col].astype(str).to_numpy(dtype=object), key
    ours = _scdrugmap_rows(frame, dataset, str(path))
    if ours is not None:
        mask, names = ours
        return X[mask], names, key
    if "obs_name" in frame.columns:
        return X, frame["obs_name"].astype(str).to_numpy(dtype=object), key
    return X, None, key


def _alignment(names, store_names: np.ndarray, dataset: str, where: str) -> np.ndarray | None:
    """``order`` with ``file_row -> store row``; None when the file is already in store order."""
    n = len(store_names)
    if len(names) != n:
        raise UserError(f"{where} has {len(names):,} cell names for dataset {dataset!r}, which has {n:,} cells")
    pos = pd.Index(store_names).get_indexer(pd.Index(names))
    unknown = [str(x) for x, p in zip(names, pos) if p < 0]
    if unknown:
        raise UserError(f"{len(unknown):,} cell name(s) of {where} are not cells of dataset {dataset!r}, e.g. "
                        f"{', '.join(map(repr, unknown[:3]))}: names must match the obs_names at ingest")
    if len(np.unique(pos)) != n:
        dups = pd.Index(names)[pd.Index(names).duplicated()].unique()[:3].tolist()
        raise UserError(f"{where} names some cells twice, e.g. {', '.join(map(repr, dups))}")
    return None if np.array_equal(pos, np.arange(n)) else pos


def _check_block(block, source: Path, lo: int, hi: int, out_dtype: str) -> None:
    block = np.asarray(block, dtype=np.float64)
    if not np.all(np.isfinite(block)):
        raise UserError(f"{source} has NaN or infinite values (in the rows of cells {lo}-{hi - 1}): "
                        "embeddings must be finite")
    if out_dtype == "float16" and np.abs(block).max(initial=0) > np.finfo(np.float16).max:
        raise UserError(f"{source} has values beyond the float16 range: import with --dtype float32")


def import_embeddings(store: Store, dataset: str, backbone: str, source, key: str | None = None,
                      cell_ids=None, cell_col: str | None = None, dtype: str | None = None,
                      replace: bool = False, params: dict | None = None,
                      chunk_rows: int = arrays.DEFAULT_CHUNK_ROWS) -> ImportReport:
    """Bring embeddings computed elsewhere into ``store`` as ``backbone`` for ``dataset``; see the module docstring."""
    store.require_writable("import-embeddings")
    if not BACKBONE_NAME_RE.match(backbone):
        raise UserError(f"backbone name {backbone!r} is invalid: use letters, digits and . _ + : @ -")
    if dtype is not None and dtype not in arrays.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(arrays.DTYPES)}")
    source = Path(source)
    if not source.is_file():
        raise UserError(f"file {source} does not exist: check the path")
    kind = _format(source, ("npy", "h5ad", "parquet"))
    if kind == "npy" and (key or cell_col):
        raise UserError("--key and --cell-col apply to .h5ad and .parquet files; a .npy file is one matrix "
                        "(give its cell names with --cell-ids)")
    [dataset] = store.require_datasets([dataset])
    row = store.datasets().set_index("dataset").loc[dataset]
    existing = store.provenance(backbone)
    if dataset in set(existing["dataset"]) and not replace:
        raise UserError(f"backbone {backbone!r} already has embeddings of dataset {dataset!r}: pass --replace to "
                        "overwrite them, or import under another --backbone name")

    if kind == "npy":
        X, names, key = _read_npy(source)
    elif kind == "h5ad":
        X, names, key = _read_h5ad(source, dataset, backbone, key, cell_col)
    else:
        X, names, key = _read_parquet(source, dataset, backbone, key, cell_col)
    if cell_ids is not None:
        names = _read_names(Path(cell_ids))
        if len(names) != X.shape[0]:
            raise UserError(f"--cell-ids {cell_ids} has {len(names):,} names but {source} has {X.shape[0]:,} rows")
    n, dim = int(row["n_cells"]), int(X.shape[1])
    if names is None:
        if X.shape[0] != n:
            raise UserError(f"{source} has {X.shape[0]:,} rows but dataset {dataset!r} has {n:,} cells: the rows "
                            "must be the dataset's cells (give their names with --cell-ids to align them)")
        order, aligned_by = None, "row order"
    else:
        store_names = store.cells(datasets=[dataset])["obs_name"].astype(str).to_numpy(dtype=object)
        order, aligned_by = _alignment(names, store_names, dataset, str(source)), "cell names"
    others = existing[existing["dataset"] != dataset]
    if len(others) and set(others["dim"].astype(int)) != {dim}:
        raise UserError(f"backbone {backbone!r} has dim {int(others['dim'].iloc[0])} in other datasets but {source} "
                        f"has {dim}: import it under another --backbone name")
    out_dtype = dtype or (X.dtype.name if X.dtype.name in arrays.DTYPES else "float32")

    info = {"origin": "external", "format": kind, "file": source.name, "file_sha256": sha256_file(source),
            "key": key, "aligned_by": aligned_by, "source_dtype": X.dtype.name, **(params or {})}
    job = {"params": info, "source_sha256": row["source_sha256"]}
    inverse = None if order is None else np.argsort(order)      # store row -> file row
    for lo in range(0, n, chunk_rows):                           # every check before anything is written
        rows = np.arange(lo, min(lo + chunk_rows, n)) if inverse is None else inverse[lo:lo + chunk_rows]
        _check_block(X[rows], source, lo, lo + len(rows), out_dtype)
    with job_lock(store.path, f"extract-{arrays.safe_name(backbone)}", f"import or extraction of backbone {backbone!r}"):
        reclaim(store, backbone)
        staged = arrays.StagedArray(store.embeddings_path, backbone, dataset, n, dim, out_dtype, chunk_rows, job)
        try:
            with disk_rollback(staged, store.embeddings_path, f"writing the imported {backbone} embeddings"):
                done = staged.done_chunks()
                for i in range(staged.n_chunks):
                    if i in done:
                        continue
                    lo, hi = staged.chunk_bounds(i)
                    rows = np.arange(lo, hi) if inverse is None else inverse[lo:hi]
                    staged.write_chunk(i, np.asarray(X[rows], dtype=np.float64 if X.dtype == np.float64
                                                     else np.float32))
        except BaseException:
            staged.discard()
            raise
        old = commit_staged(store, staged, {
            "backbone": backbone, "dataset": dataset, "n_cells": n, "dim": dim,
            "dtype": out_dtype, "chunk_rows": chunk_rows, "scdrugmap_version": __version__,
            "checkpoint_sha256": None, "source_sha256": row["source_sha256"],
            "params": json.dumps(info, sort_keys=True, default=str), "created_at": now(), "origin": "external"})
    return ImportReport(backbone, dataset, n, dim, out_dtype, aligned_by, order is not None, bool(old))

