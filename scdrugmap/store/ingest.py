"""Ingest: validate an .h5ad completely, then register its dataset and cells in one transaction.

Nothing is written until every check has passed, so a rejected file leaves the store (or
the absence of one) exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from . import source as src
from .schema import CELL_CORE_COLUMNS, COHORT_VIEW, DATASET_CONTEXT_COLUMNS
from .common import INDEX, DiskError, disk_errno, is_url, local_path, now
from .locks import remove_stale_work_dirs, work_dir
from .store import Store

DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Spellings mapped without being asked (compared lower-case, with '-', '_' and spaces alike).
# Anything else must be named with --sensitive / --resistant: guessing a label is worse
# than asking.
SENSITIVE_SPELLINGS = {"sensitive", "sensitivity", "sens", "s", "responder", "responders", "responsive",
                       "response", "good response", "complete response", "cr", "drug sensitive"}
RESISTANT_SPELLINGS = {"resistant", "resistance", "resist", "res", "r", "non responder", "nonresponder",
                       "non responders", "nonresponders", "non responsive", "nonresponsive", "no response",
                       "poor response", "progressive disease", "pd", "drug resistant"}
LABELS = ("sensitive", "resistant")


def _norm(value) -> str:
    return re.sub(r"[\s_\-]+", " ", str(value).strip().lower())


def map_labels(values: pd.Series, sensitive=(), resistant=()) -> dict[str, str]:
    """Map every distinct raw label to 'sensitive' or 'resistant', or say which ones cannot be."""
    explicit = {**{_norm(v): "sensitive" for v in sensitive}, **{_norm(v): "resistant" for v in resistant}}
    both = {_norm(v) for v in sensitive} & {_norm(v) for v in resistant}
    if both:
        raise UserError(f"label value(s) {sorted(both)} given as both --sensitive and --resistant")
    mapping, unmapped = {}, []
    for raw in pd.unique(values.astype(str)):
        key = _norm(raw)
        if key in explicit:
            mapping[raw] = explicit[key]
        elif not explicit and key in SENSITIVE_SPELLINGS:
            mapping[raw] = "sensitive"
        elif not explicit and key in RESISTANT_SPELLINGS:
            mapping[raw] = "resistant"
        else:
            unmapped.append(raw)
    if unmapped:
        raise UserError(f"label value(s) {', '.join(map(repr, sorted(unmapped)))} are not mapped to sensitive/resistant: "
                        "name them with --sensitive VALUE / --resistant VALUE")
    return mapping


@dataclass
class IngestRequest:
    """Everything ``scdrugmap ingest`` takes; see ``scdrugmap ingest --help``."""

    file: Path
    dataset: str
    label_col: str | None = None             # None: every cell unlabelled (extract/predict only)
    sensitive: tuple = ()
    resistant: tuple = ()
    sample_col: str | None = None
    patient_col: str | None = None
    values: str | None = None
    layer: str | None = None
    use_raw: bool = False                     # read the file's .raw (scanpy's adata.raw)
    symbol_col: str | None = None
    context: dict = field(default_factory=dict)   # drug, cancer_type, tissue, therapy, regimen
    replace: bool = False


@dataclass
class IngestReport:
    dataset: str
    n_cells: int
    n_genes: int
    n_sensitive: int
    n_resistant: int
    gene_id_type: str
    value_kind: str
    replaced: bool
    warnings: list
    n_unlabelled: int = 0
    notes: list = field(default_factory=list)


def _obs_column(obs: pd.DataFrame, col: str | None, option: str) -> pd.Series | None:
    if col is None:
        return None
    if col not in obs.columns:
        raise UserError(f"{option} {col!r} is not an obs column: the file has {', '.join(obs.columns) or 'none'}")
    return obs[col]


def _extra_obs(obs: pd.DataFrame, used: set[str]) -> pd.DataFrame:
    """The other obs columns, kept queryable; names that clash with store columns get an 'obs_' prefix."""
    reserved = set(CELL_CORE_COLUMNS) | set(DATASET_CONTEXT_COLUMNS) | {"cell_id"}
    extra = {}
    for col in obs.columns:
        if col in used:
            continue
        name = f"obs_{col}" if col.lower() in reserved else str(col)
        series = obs[col]
        if isinstance(series.dtype, pd.CategoricalDtype):
            cats = series.cat.categories.dtype
            series = series.astype(cats if pd.api.types.is_numeric_dtype(cats) else object)
        if not (pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype)):
            series = series.astype(object).map(lambda v: None if pd.isna(v) else str(v))
        extra[name] = series.to_numpy()
    return pd.DataFrame(extra, index=obs.index)


def _duck_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series.dtype):
        return "BOOLEAN"
    if pd.api.types.is_integer_dtype(series.dtype):
        return "BIGINT"
    if pd.api.types.is_float_dtype(series.dtype):
        return "DOUBLE"
    return "VARCHAR"


OBS_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def _read_obs_table(path: Path) -> pd.DataFrame:
    """An obs-only table (.csv/.tsv): first column the cell names, the others obs columns."""
    if not path.exists():
        raise UserError(f"file {path} does not exist: check the path")
    try:
        obs = pd.read_csv(path, sep=OBS_TABLE_SUFFIXES[path.suffix.lower()], index_col=0)
    except Exception as e:  # pandas raises many types for a malformed table
        raise UserError(f"cannot read {path} as a table ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "give a .csv/.tsv whose first column holds the cell names") from None
    obs.index = obs.index.astype(str)
    return obs


def _label_columns(obs, req, warnings) -> tuple[pd.Series, pd.Series, dict]:
    """(label, label_raw, label_map) per cell; cells without a label value get None in both."""
    if req.label_col is None:
        if req.sensitive or req.resistant:
            raise UserError("--sensitive/--resistant need --label-col: name the obs column holding the labels")
        none = pd.Series([None] * len(obs), dtype=object)
        return none, none, {}
    labels = _obs_column(obs, req.label_col, "--label-col").reset_index(drop=True)
    missing = labels.isna().to_numpy() | labels.astype(str).str.strip().isin(["", "nan", "NaN", "None"]).to_numpy()
    if missing.all():
        raise UserError(f"label column {req.label_col!r} has no values: name another column, "
                        "or leave out --label-col to ingest the cells unlabelled")
    raw = labels.astype(object).where(~missing, None).map(lambda v: None if v is None else str(v))
    label_map = map_labels(raw[~missing], req.sensitive, req.resistant)
    if missing.any():
        warnings.append(f"{int(missing.sum()):,} cells have no value in label column {req.label_col!r}: "
                        "they are kept unlabelled (extracted and predicted, never used to train or score)")
    return raw.map(lambda v: None if v is None else label_map[v]).astype(object), raw.astype(object), label_map


def check_dataset_name(name: str | None) -> None:
    if not DATASET_NAME_RE.match(name or ""):
        raise UserError(f"dataset name {name!r} is invalid: use letters, digits, '.', '_' or '-' "
                        "(at most 100, starting with a letter or digit)")


def validate(req: IngestRequest, show_progress: bool = False):
    """All checks, no writes. Returns what :func:`ingest` registers."""
    check_dataset_name(req.dataset)
    if req.values is not None and req.values not in src.VALUE_KINDS:
        raise UserError(f"--values must be one of {', '.join(src.VALUE_KINDS)}")
    if req.use_raw and req.layer is not None:
        raise UserError("--layer and --use-raw both name the matrix to read: give one of them")
    layer = src.RAW if req.use_raw else req.layer
    path = Path(req.file).resolve()
    notes = []
    if path.suffix.lower() in OBS_TABLE_SUFFIXES:
        obs, adata = _read_obs_table(path), None
    else:
        adata = src.open_h5ad(path)
        obs = adata.obs.copy()
    try:
        if len(obs) == 0:
            raise UserError(f"{path} has no cells")
        if not obs.index.is_unique:
            dups = obs.index[obs.index.duplicated()].unique()[:3].tolist()
            raise UserError(f"cell names (obs_names) are not unique, e.g. {dups}: "
                            "make them unique (adata.obs_names_make_unique()) before ingest")
        warnings = []
        label, label_raw, label_map = _label_columns(obs, req, warnings)
        samples = _obs_column(obs, req.sample_col, "--sample-col")
        patients = _obs_column(obs, req.patient_col, "--patient-col")
        if adata is None or adata.n_vars == 0:      # embeddings-only: cells and metadata, no expression
            given = [o for o, v in (("--values", req.values), ("--layer", req.layer), ("--use-raw", req.use_raw),
                                    ("--symbol-col", req.symbol_col)) if v]
            if given:
                raise UserError(f"{', '.join(given)}: the file has no genes (an embeddings-only dataset): "
                                "leave them out, and bring its embeddings with 'scdrugmap import-embeddings'")
            genes = src.GeneIds(src.NO_EXPRESSION, None, None)
            choice = src.ValueChoice(None, src.NO_EXPRESSION,
                                     "no genes: an embeddings-only dataset; bring its embeddings with "
                                     "'scdrugmap import-embeddings' (no backbone can extract it)")
            n_genes = 0
        else:
            choice = src.choose_values(adata, layer, req.values, show_progress)
            var_names, var = src.var_of(adata, choice.layer)
            genes = src.detect_gene_ids(var_names, var.columns, req.symbol_col)
            n_genes = len(var_names)
        if choice.note:
            notes.append(choice.note)
    finally:
        if adata is not None:
            adata.file.close()

    cells = pd.DataFrame({
        "dataset": req.dataset,
        "row": np.arange(len(obs), dtype=np.int32),
        "obs_name": obs.index.astype(str),
        "label": label.to_numpy(),
        "label_raw": label_raw.to_numpy(),
        "sample": samples.astype(str).to_numpy() if samples is not None else None,
        "patient": patients.astype(str).to_numpy() if patients is not None else None,
    })
    used = {c for c in (req.label_col, req.sample_col, req.patient_col) if c}
    extra = _extra_obs(obs, used).reset_index(drop=True)
    if genes.note:
        warnings.append(genes.note)
    counts = cells["label"].value_counts()
    if req.label_col is None:
        warnings.append(f"dataset {req.dataset!r} has no labels (no --label-col): its cells can be extracted and "
                        "predicted, never used to train or score")
    elif len(counts) < 2:
        warnings.append(f"dataset {req.dataset!r} has only {counts.index[0]!r} cells: "
                        "probes need both classes, so it can be evaluated only in a cohort with other datasets")
    dataset_row = {
        "dataset": req.dataset, "n_cells": len(cells), "n_genes": int(n_genes),
        "n_sensitive": int(counts.get("sensitive", 0)), "n_resistant": int(counts.get("resistant", 0)),
        "source_path": str(path), "source_sha256": src.sha256_file(path), "source_layer": choice.layer,
        "value_kind": choice.kind, "gene_id_type": genes.id_type, "symbol_col": genes.symbol_col,
        "ensembl_col": genes.ensembl_col, "label_col": req.label_col,
        "label_map": json.dumps(label_map, sort_keys=True), "sample_col": req.sample_col,
        "patient_col": req.patient_col,
        **{k: req.context.get(k) for k in DATASET_CONTEXT_COLUMNS},
        "scdrugmap_version": __version__, "ingested_at": now(),
    }
    return dataset_row, pd.concat([cells, extra], axis=1), warnings, notes


def ingest(store_path, req: IngestRequest, show_progress: bool = False) -> IngestReport:
    """Validate ``req.file`` completely, then register it in the store at ``store_path``.

    A new store is built in a hidden sibling folder and renamed into place with its first
    dataset, so a killed first ingest leaves no half-made store (the folder is removed by the
    next command that creates the store). Whether the dataset is already there is decided
    inside the write transaction, so two ingests of one name cannot both succeed."""
    if is_url(store_path):
        raise UserError(f"{store_path} is a URL: stores opened by URL are read-only; ingest into a local store")
    dataset_row, cells, warnings, notes = validate(req, show_progress)
    store_path = local_path(store_path)
    if not (store_path / INDEX).exists():
        if store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir())):
            raise UserError(f"{store_path} exists and is not a scdrugmap store: choose a new or empty directory")
        if _create_with(store_path, dataset_row, cells):
            return _report(req, dataset_row, False, warnings, notes)
    store = Store.open(store_path)            # existed, or another ingest created it meanwhile
    store.require_writable("ingest")
    remove_stale_work_dirs(store_path.parent, store_path.name, "creating")      # of a killed first ingest
    present, stale_arrays = _register(store, dataset_row, cells, replace=req.replace)
    for rel in stale_arrays:
        shutil.rmtree(store.embeddings_path / rel, ignore_errors=True)
    return _report(req, dataset_row, present, warnings, notes)


def _report(req, dataset_row, replaced, warnings, notes) -> IngestReport:
    n = dataset_row["n_cells"] - dataset_row["n_sensitive"] - dataset_row["n_resistant"]
    return IngestReport(req.dataset, dataset_row["n_cells"], dataset_row["n_genes"], dataset_row["n_sensitive"],
                        dataset_row["n_resistant"], dataset_row["gene_id_type"], dataset_row["value_kind"],
                        replaced, warnings, n, notes)


def _create_with(store_path: Path, dataset_row: dict, cells: pd.DataFrame) -> bool:
    """Create the store at ``store_path`` holding the dataset; False when another process created
    it first (then nothing of ours remains)."""
    made = [p for p in reversed(store_path.parents) if not p.exists()]
    try:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise DiskError(code, store_path.parent, "creating the store's folder") from None
    try:
        with work_dir(store_path, "creating") as work:
            _register(Store.create(work / "store"), dataset_row, cells, replace=False)
            try:
                if store_path.is_dir() and not any(store_path.iterdir()):
                    store_path.rmdir()                  # an empty directory named by the user
                os.rename(work / "store", store_path)
            except OSError:
                if (store_path / INDEX).exists():       # another ingest made the store first
                    return False
                raise
        return True
    except BaseException as e:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        code = disk_errno(e)
        if code is not None and not isinstance(e, UserError):
            raise DiskError(code, store_path, "creating the store") from None
        raise


def _register(store: Store, dataset_row: dict, cells: pd.DataFrame, replace: bool) -> tuple[bool, list[str]]:
    """Insert the dataset (replacing it when ``replace``); returns whether it was there, and the
    arrays of the replaced dataset (to delete once the transaction is committed)."""
    name = dataset_row["dataset"]
    with store.transaction() as con:
        stale = []
        present = con.execute("SELECT 1 FROM datasets WHERE dataset = ?", [name]).fetchone() is not None
        if present and not replace:
            raise UserError(f"dataset {name!r} is already in the store: pass --replace to re-ingest it "
                            "(its embeddings and probe results are dropped)")
        if present:
            stale = [r[0] for r in con.execute("SELECT array_path FROM provenance WHERE dataset = ?", [name]).fetchall()]
            runs = [r[0] for r in con.execute(
                "SELECT run_id FROM probe_runs WHERE list_contains(datasets, ?)", [name]).fetchall()]
            if runs:
                con.execute("DELETE FROM probe_results WHERE run_id IN (SELECT unnest(?))", [runs])
                con.execute("DELETE FROM probe_predictions WHERE run_id IN (SELECT unnest(?))", [runs])
                con.execute("DELETE FROM probe_runs WHERE run_id IN (SELECT unnest(?))", [runs])
            con.execute("DELETE FROM provenance WHERE dataset = ?", [name])
            con.execute("DELETE FROM cells WHERE dataset = ?", [name])
            con.execute("DELETE FROM datasets WHERE dataset = ?", [name])
        existing = {r[0]: r[1] for r in con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'cells'").fetchall()}
        for col in cells.columns:
            if col in CELL_CORE_COLUMNS:
                continue
            if col in existing:
                if existing[col] != "VARCHAR" and _duck_type(cells[col]) != existing[col]:
                    con.execute(f'ALTER TABLE cells ALTER COLUMN "{col}" TYPE VARCHAR')
            else:
                con.execute(f'ALTER TABLE cells ADD COLUMN "{col}" {_duck_type(cells[col])}')
        cols = list(dataset_row)
        con.execute(f"INSERT INTO datasets ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [dataset_row[c] for c in cols])
        con.register("incoming_cells", cells)
        names = ", ".join(f'"{c}"' for c in cells.columns)
        con.execute(f"INSERT INTO cells ({names}) SELECT {names} FROM incoming_cells")
        con.unregister("incoming_cells")
        con.execute(COHORT_VIEW)
    return present, stale
