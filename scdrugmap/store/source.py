"""Reading a dataset's source ``.h5ad``: validation at ingest, row chunks at extraction.

The store keeps no copy of the expression matrix: extraction re-reads the source file, and
refuses it if its sha256 differs from the one recorded at ingest.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from . import gene_ids

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@]*$")
SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene_symbols", "feature_name", "gene_name", "gene_short_name")
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id")
VALUE_KINDS = ("counts", "normalized", "log1p")
READ_CHUNK = 8192


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def open_h5ad(path):
    """Open an .h5ad backed (matrix stays on disk), turning every failure into a clear error."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise UserError(f"file {path} does not exist: check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file: give an .h5ad file")
    try:
        import h5py
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an .h5ad file (not HDF5): convert it with anndata's write_h5ad")
        with warnings.catch_warnings():
            # duplicate obs/var names: ingest refuses duplicate cells itself, with its own one-line error
            warnings.filterwarnings("ignore", message=r".* names are not unique", category=UserWarning)
            return ad.read_h5ad(path, backed="r")
    except UserError:
        raise
    except Exception as e:  # anndata raises many types for a malformed file
        raise UserError(f"cannot read {path} as .h5ad ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "check it opens with anndata.read_h5ad") from None


def matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise UserError(f"layer {layer!r} not found: the file has layers {list(adata.layers.keys()) or 'none'}")
    return adata.layers[layer]


def iter_row_chunks(adata, layer: str | None, start: int = 0, stop: int | None = None,
                    chunk: int = READ_CHUNK):
    """Yield ``(lo, hi, csr_matrix)`` row blocks of the expression matrix."""
    X = matrix(adata, layer)
    stop = adata.n_obs if stop is None else stop
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        yield lo, hi, rows_csr(X, lo, hi)


def rows_csr(X, lo: int, hi: int) -> sp.csr_matrix:
    block = X[lo:hi]
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    return sp.csr_matrix(block)


def detect_value_kind(adata, layer: str | None, declared: str | None, show_progress: bool = False) -> str:
    """'counts' when every value is a non-negative integer; otherwise the user must say what it is."""
    from ..progress import progress_bar

    with progress_bar("checking values", total=adata.n_obs, enabled=show_progress) as advance:
        return _value_kind(adata, layer, declared, advance)


def _value_kind(adata, layer, declared, advance) -> str:
    nonint = False
    for lo, hi, block in iter_row_chunks(adata, layer):
        advance(hi - lo)
        data = block.data
        if data.size == 0:
            continue
        if not np.all(np.isfinite(data)):
            bad = int(np.sum(~np.isfinite(data)))
            raise UserError(f"the expression matrix has {bad} NaN/inf values (rows {lo}-{hi - 1} and maybe more): "
                            "fix or drop those cells before ingest")
        if data.min() < 0:
            raise UserError("the expression matrix has negative values (scaled data?): "
                            "ingest raw counts, or normalized/log1p values, which are never negative")
        if not nonint and np.issubdtype(data.dtype, np.floating) and np.any(data != np.round(data)):
            nonint = True
    if declared is not None:
        return declared
    if nonint:
        raise UserError("the expression matrix has non-integer values, so it is not raw counts: "
                        "ingest raw counts (e.g. --layer counts), or say --values normalized|log1p")
    return "counts"


@dataclass
class GeneIds:
    id_type: str                  # "symbol" | "ensembl" | "entrez"
    symbol_col: str | None        # None: var_names are the symbols (or no symbols known; entrez: the HGNC table)
    ensembl_col: str | None       # None: var_names are the Ensembl IDs (or none known; entrez: the HGNC table)
    note: str | None = None       # entrez: how many IDs the HGNC table maps, when not all


def detect_gene_ids(var_names, var_columns, symbol_col: str | None = None) -> GeneIds:
    names = [str(v) for v in var_names]
    if not names:
        raise UserError("the file has no genes (var is empty)")
    ens = np.mean([bool(ENSEMBL_RE.match(n)) for n in names])
    cols = list(var_columns)
    if symbol_col is not None and symbol_col not in cols:
        raise UserError(f"--symbol-col {symbol_col!r} is not a var column: the file has {cols or 'none'}")
    entrez = gene_ids.as_entrez(var_names)
    if entrez is not None:
        _, note = gene_ids.check_entrez(entrez)
        return GeneIds("entrez", symbol_col, None, note)
    if ens >= 0.9:
        sym = symbol_col or next((c for c in SYMBOL_COLUMNS if c in cols), None)
        return GeneIds("ensembl", sym, None)
    looks_symbol = np.mean([bool(SYMBOL_RE.match(n)) and any(ch.isalpha() for ch in n) for n in names])
    if looks_symbol < 0.9:
        raise UserError("gene identifiers in var_names are neither gene symbols nor Ensembl IDs nor NCBI Gene "
                        f"(Entrez) IDs (e.g. {names[:3]}): set var_names to symbols, Ensembl IDs or Entrez IDs")
    return GeneIds("symbol", symbol_col, next((c for c in ENSEMBL_COLUMNS if c in cols), None))


def gene_symbols(adata, row, upper: bool = True) -> np.ndarray:
    """Gene symbols of a source file in var order (upper-cased unless ``upper=False``)."""
    if row["symbol_col"]:
        symbols = adata.var[row["symbol_col"]].astype(str).to_numpy()
    elif row["gene_id_type"] == "symbol":
        symbols = np.asarray(adata.var_names.astype(str))
    elif row["gene_id_type"] == "entrez":
        symbols = gene_ids.entrez_symbols(entrez_ids(adata))
    else:
        raise UserError(f"dataset {row['dataset']!r} has Ensembl IDs and no gene-symbol column: "
                        "re-ingest with --symbol-col naming the var column that holds symbols")
    symbols = symbols.astype(str)
    return np.char.upper(symbols) if upper else symbols


def entrez_ids(adata) -> np.ndarray:
    """The NCBI Gene (Entrez) IDs of a dataset ingested with gene_id_type 'entrez', in var order."""
    ids = gene_ids.as_entrez(adata.var_names)
    if ids is None:
        raise UserError("the source file's var_names are no longer NCBI Gene (Entrez) IDs: re-ingest it with --replace")
    return ids


def verify_source(row) -> Path:
    """The dataset's source file, checked against the sha256 recorded at ingest."""
    path = Path(row["source_path"])
    if not path.exists():
        raise UserError(f"source file of dataset {row['dataset']!r} is missing: {path} "
                        "(move it back, or re-ingest with --replace)")
    if sha256_file(path) != row["source_sha256"]:
        raise UserError(f"source file {path} of dataset {row['dataset']!r} changed after ingest "
                        "(sha256 differs): re-ingest it with --replace")
    return path
