"""Reading a dataset's source ``.h5ad``: validation at ingest, row chunks at extraction.

The store keeps no copy of the expression matrix: extraction re-reads the source file, and
refuses it if its sha256 differs from the one recorded at ingest.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from . import gene_ids
from .common import sha256_file  # noqa: F401  (ingest and exchange use it from here)

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@]*$")
SYMBOL_COLUMNS = ("symbol", "gene_symbol", "gene_symbols", "feature_name", "gene_name", "gene_short_name")
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "feature_id")
VALUE_KINDS = ("counts", "normalized", "log1p", "scaled")
NO_EXPRESSION = "none"            # value kind of an embeddings-only dataset (no genes)
RAW = ".raw"                      # source_layer of a matrix read from the file's .raw (scanpy's adata.raw)
COUNTS_LAYER = "counts"
READ_CHUNK = 8192


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


def layer_label(layer: str | None) -> str:
    """How a source matrix is named in messages: X, layers['counts'] or .raw."""
    return "X" if layer is None else ".raw" if layer == RAW else f"layers[{layer!r}]"


def matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer == RAW:
        if adata.raw is None:
            raise UserError("--use-raw: the file has no .raw: read X, or name a layer with --layer")
        return adata.raw.X
    if layer not in adata.layers:
        raise UserError(f"layer {layer!r} not found: the file has layers {list(adata.layers.keys()) or 'none'}")
    return adata.layers[layer]


def var_of(adata, layer: str | None):
    """``(var_names, var)`` of the genes of the source matrix: .raw has its own genes."""
    if layer == RAW and adata.raw is not None:
        return adata.raw.var_names, adata.raw.var
    return adata.var_names, adata.var


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


@dataclass
class ValueScan:
    negative: bool = False
    nonint: bool = False

    @property
    def counts(self) -> bool:
        return not (self.negative or self.nonint)


def scan_values(adata, layer: str | None, show_progress: bool = False) -> ValueScan:
    """Whether the matrix has negative or non-integer values; NaN/inf is an error."""
    from ..progress import progress_bar

    scan = ValueScan()
    with progress_bar(f"checking values of {layer_label(layer)}", total=adata.n_obs, enabled=show_progress) as advance:
        for lo, hi, block in iter_row_chunks(adata, layer):
            advance(hi - lo)
            data = block.data
            if data.size == 0:
                continue
            if not np.all(np.isfinite(data)):
                bad = int(np.sum(~np.isfinite(data)))
                raise UserError(f"the expression matrix has {bad} NaN/inf values (rows {lo}-{hi - 1} and maybe more): "
                                "fix or drop those cells before ingest")
            if not scan.negative and data.min() < 0:
                scan.negative = True
            if not scan.nonint and np.issubdtype(data.dtype, np.floating) and np.any(data != np.round(data)):
                scan.nonint = True
    return scan


@dataclass
class ValueChoice:
    layer: str | None         # the matrix read: None (X), a layer name, or RAW
    kind: str                 # counts | normalized | log1p | scaled
    note: str | None = None   # said to the user when the matrix was chosen for them


def choose_values(adata, layer: str | None, declared: str | None, show_progress: bool = False) -> ValueChoice:
    """The matrix to read and its value kind.

    A matrix named with --layer / --use-raw, or declared with --values, is taken as given
    (negative values only with --values scaled). Otherwise X is used when it holds raw counts;
    when it does not, a ``counts`` layer or ``.raw`` holding raw counts is used instead (both:
    ambiguous, refused); failing that the user must say what X holds."""
    scan = scan_values(adata, layer, show_progress)
    if declared is not None:
        if scan.negative and declared != "scaled":
            raise UserError(f"{layer_label(layer)} has negative values, so it is not {declared} values: "
                            "say --values scaled for z-scored/scaled data")
        return ValueChoice(layer, declared)
    if scan.counts:
        return ValueChoice(layer, "counts")
    what = "negative" if scan.negative else "non-integer"
    if layer is None:
        found = []
        if COUNTS_LAYER in adata.layers:
            found.append(COUNTS_LAYER)
        if adata.raw is not None:
            found.append(RAW)
        found = [c for c in found if scan_values(adata, c, show_progress).counts]
        if len(found) > 1:
            raise UserError("X is not raw counts, and both layers['counts'] and .raw hold raw counts: "
                            "choose one with --layer counts or --use-raw")
        if found:
            return ValueChoice(found[0], "counts",
                               f"X holds {what} values, so the raw counts in {layer_label(found[0])} are used")
    if scan.negative:
        raise UserError(f"{layer_label(layer)} has negative values (scaled/z-scored data?): say --values scaled "
                        "(only the hvg and pca baselines read scaled values), or ingest raw counts (--layer counts)")
    raise UserError(f"{layer_label(layer)} has non-integer values, so it is not raw counts: "
                    "ingest raw counts (e.g. --layer counts or --use-raw), or say --values normalized|log1p|scaled")


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
    var_names, var = var_of(adata, row.get("source_layer"))
    if row["symbol_col"]:
        symbols = var[row["symbol_col"]].astype(str).to_numpy()
    elif row["gene_id_type"] == "symbol":
        symbols = np.asarray(var_names.astype(str))
    elif row["gene_id_type"] == "entrez":
        symbols = gene_ids.entrez_symbols(entrez_ids(adata, row.get("source_layer")))
    else:
        raise UserError(f"dataset {row['dataset']!r} has Ensembl IDs and no gene-symbol column: "
                        "re-ingest with --symbol-col naming the var column that holds symbols")
    symbols = symbols.astype(str)
    return np.char.upper(symbols) if upper else symbols


def entrez_ids(adata, layer: str | None = None) -> np.ndarray:
    """The NCBI Gene (Entrez) IDs of a dataset ingested with gene_id_type 'entrez', in the order of
    the genes of its source matrix (.raw has its own)."""
    ids = gene_ids.as_entrez(var_of(adata, layer)[0])
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
