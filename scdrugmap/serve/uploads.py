"""Uploaded files: saved under a server-chosen name, converted when they are a table, and
registered with the same validation as ``scdrugmap ingest``.

A request never names a path: the file goes to a temporary file in the upload folder, and is
kept (extraction reads it later, as it reads any ingested source) as ``<dataset>-<sha256>.h5ad``.
A file that fails validation is deleted, and the store is left as it was (ingest writes
nothing before every check has passed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import UserError
from ..store.common import disk_error_or

FORMATS = {".h5ad": "h5ad", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}
BLOCK = 1 << 20


class TooLarge(UserError):
    pass


def upload_format(filename: str | None) -> str:
    """'h5ad', 'csv' or 'tsv' from the uploaded file's name (only its suffix is used)."""
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"the uploaded file {filename!r} is not .h5ad, .csv or .tsv: upload an AnnData .h5ad file "
                        "or a table (cell barcode, a condition column, one column per gene)")
    return FORMATS[suffix]


async def save_stream(upload, folder: Path, limit: int) -> tuple[Path, str]:
    """Copy an uploaded file into a new temporary file in ``folder``; (path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=folder)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                block = await upload.read(BLOCK)
                if not block:
                    break
                size += len(block)
                if size > limit:
                    raise TooLarge(f"the upload is larger than the server's limit of {limit / 1e6:,.0f} MB: "
                                   "start the server with a larger --max-upload-mb")
                digest.update(block)
                out.write(block)
    except BaseException as e:
        Path(name).unlink(missing_ok=True)
        raise disk_error_or(e, folder, "saving the upload") from None
    if size == 0:
        Path(name).unlink(missing_ok=True)
        raise UserError("the uploaded file is empty: choose a file")
    return Path(name), digest.hexdigest()


def table_to_h5ad(path: Path, sep: str, condition_col: str, dest: Path) -> None:
    """scDrugMap's web format (cell barcode, a condition column, one column per gene) as an .h5ad."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    try:
        frame = pd.read_csv(path, sep=sep, index_col=0)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise UserError(f"the uploaded table cannot be read: {' '.join(str(e).split())[:200]}: upload a "
                        f"{'comma' if sep == ',' else 'tab'}-separated table with a header row") from None
    if condition_col not in frame.columns:
        raise UserError(f"the uploaded table has no column {condition_col!r} (its first columns: "
                        f"{', '.join(map(str, frame.columns[:5]))}): name the condition column in the form")
    obs = frame[[condition_col]].astype(str)
    genes = frame.drop(columns=[condition_col])
    bad = [c for c in genes.columns if not pd.api.types.is_numeric_dtype(genes[c])]
    if bad:
        raise UserError(f"gene column(s) {', '.join(map(str, bad[:3]))} hold values that are not numbers: every "
                        "column but the barcode and the condition must be a gene's expression")
    if genes.shape[1] == 0:
        raise UserError("the uploaded table has no gene columns")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=sp.csr_matrix(genes.to_numpy(dtype=np.float32)), obs=obs,
                       var=pd.DataFrame(index=genes.columns.astype(str)))
    adata.write_h5ad(dest)


def register(store_path: Path, part: Path, sha: str, fmt: str, folder: Path, request):
    """Convert (tables), keep the file under its final name and ingest it; everything of this
    upload is removed again when it is refused."""
    from ..store.ingest import check_dataset_name, ingest

    final, made = folder / f"{request.dataset}-{sha[:16]}.h5ad", False
    try:
        check_dataset_name(request.dataset)   # before the file takes a name made from it
        if final.exists():
            raise UserError(f"this file was already uploaded as dataset {request.dataset!r}: open it in Datasets")
        made = True
        if fmt == "h5ad":
            os.replace(part, final)
        else:
            table_to_h5ad(part, "," if fmt == "csv" else "\t", request.label_col, final)
        request.file = final
        return ingest(store_path, request)
    except BaseException:
        if made:
            final.unlink(missing_ok=True)
        raise
    finally:
        part.unlink(missing_ok=True)
