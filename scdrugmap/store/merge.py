"""Merging two stores into a new one: the union of datasets, embeddings and results.

Nothing is recomputed: index rows are copied through DuckDB (both sources attached
read-only) and embedding arrays are copied file by file. The same dataset in both stores
must be the same ingest (same source sha256, same settings and context), and the same
backbone x dataset must have the same provenance (parameters, checkpoint, source, dim,
dtype, origin); anything else is a *conflict*. Conflicts are all listed in one error unless
``prefer`` ('A' or 'B') names the side to keep; then the other side's version of that
dataset (with its embeddings) or of that embedding is left out, and so are its probe runs
that used it. The new store is built in a temporary sibling directory and moved into place
at the end, so a failed merge leaves nothing behind.

Saved heads (``scdrugmap fit``: ``models`` rows and their ``models/heads/`` folders) travel
with their predictions. The same model name in both stores must be the same head (same
manifest sha256), else it is a conflict; a kept model takes its own side's predictions (and
the other side's too when both hold the identical head), except predictions of a dataset
whose other version was kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from ..errors import UserError
from .pack import _make_parent, _remove_empty, check_destination
from .schema import CELL_CORE_COLUMNS, COHORT_VIEW
from .common import INDEX, DiskError, disk_errno, is_url, local_path, now
from .locks import wait_for_index, work_dir
from .common import first_line as _first_line
from .common import sha256_file
from .heads import HEADS_DIR
from .store import Store

# what makes two ingests of a dataset the same (besides the name)
DATASET_IDENTITY = ("source_sha256", "n_cells", "n_genes", "source_layer", "value_kind", "gene_id_type",
                    "symbol_col", "ensembl_col", "label_col", "label_map", "sample_col", "patient_col",
                    "drug", "cancer_type", "tissue", "therapy", "regimen")
# what makes two embeddings of a backbone x dataset the same
PROVENANCE_IDENTITY = ("source_sha256", "checkpoint_sha256", "params", "n_cells", "dim", "dtype", "origin")
RUN_IDENTITY = ("backbone", "head", "method", "protocol", "group_by", "where_sql", "seed", "positive_label",
                "datasets", "n_cells", "params", "created_at")
SIDES = ("A", "B")


@dataclass
class MergeReport:
    into: Path
    datasets: list
    backbones: list
    n_runs: int
    resolved: list = field(default_factory=list)     # conflicts settled by --prefer
    dropped_runs: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    models: list = field(default_factory=list)
    n_predictions: int = 0
    seconds: float = 0.0


def _norm(value):
    if value is None:
        return None
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def _rows(store: Store, query: str) -> list[dict]:
    with store.connect() as con:
        cur = con.execute(query)
        names = [d[0] for d in cur.description]
        return [{n: _norm(v) for n, v in zip(names, row)} for row in cur.fetchall()]


def _params(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _differs(a: dict, b: dict, columns) -> list[str]:
    out = []
    for col in columns:
        x, y = a.get(col), b.get(col)
        if col == "params":
            x, y = _params(x), _params(y)
        if x != y:
            out.append(col)
    return out


def _short(value) -> str:
    return (str(value)[:12] + "…") if value else "none"




def _model_files(store: Store) -> dict[str, Path]:
    root = store.path / "models"
    return {p.relative_to(store.path).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.is_dir() else {}


def merge(a, b, into, prefer: str | None = None) -> MergeReport:
    """Merge the stores at ``a`` and ``b`` into a new store at ``into``; see the module docstring."""
    t0 = time.perf_counter()
    if prefer is not None:
        prefer = str(prefer).upper()
        if prefer not in SIDES:
            raise UserError(f"--prefer must be A or B, not {prefer!r}")
    for p in (a, b, into):
        if is_url(p):
            raise UserError(f"{p} is a URL: merge reads and writes local store directories")
    into = local_path(into)
    stores = {"A": Store.open(a), "B": Store.open(b)}
    roots = {s.path.resolve() for s in stores.values()}
    if len(roots) == 1:
        raise UserError("A and B are the same store: give two different stores")
    if into.exists() and not (into.is_dir() and not any(into.iterdir())):
        raise UserError(f"{into} exists and is not empty: merge into a new or empty directory")
    target = into.resolve()
    if any(target == r or r in target.parents for r in roots):
        raise UserError(f"{into} is inside store A or B: merge into a directory outside both")

    data = {side: {
        "datasets": {r["dataset"]: r for r in _rows(s, "SELECT * FROM datasets")},
        "provenance": {(r["backbone"], r["dataset"]): r for r in _rows(s, "SELECT * FROM provenance")},
        "runs": {r["run_id"]: r for r in _rows(s, "SELECT * FROM probe_runs")},
        "models": _model_files(s),
        "heads": {r["name"]: r for r in _rows(s, "SELECT * FROM models")},
    } for side, s in stores.items()}
    conflicts: list[str] = []

    def other(side):
        return "B" if side == "A" else "A"

    # datasets: same name must be the same ingest
    ds_side, ds_conflict = {}, set()
    for name in sorted(set(data["A"]["datasets"]) | set(data["B"]["datasets"])):
        rows = {side: data[side]["datasets"].get(name) for side in SIDES}
        if rows["A"] and rows["B"]:
            diff = _differs(rows["A"], rows["B"], DATASET_IDENTITY)
            if diff:
                if "source_sha256" in diff:
                    what = (f"source sha256 differs (A {_short(rows['A']['source_sha256'])}, "
                            f"B {_short(rows['B']['source_sha256'])})")
                else:
                    what = f"ingest settings differ ({', '.join(diff)})"
                conflicts.append(f"dataset {name!r}: {what}")
                ds_conflict.add(name)
            ds_side[name] = prefer or "A"
        else:
            ds_side[name] = "A" if rows["A"] else "B"

    # embeddings: same backbone x dataset must have the same provenance
    prov_side, prov_conflict = {}, set()
    for key in sorted(set(data["A"]["provenance"]) | set(data["B"]["provenance"])):
        backbone, dataset = key
        rows = {side: data[side]["provenance"].get(key) for side in SIDES}
        if dataset in ds_conflict:                   # embeddings follow the dataset they were made from
            if rows[ds_side[dataset]]:
                prov_side[key] = ds_side[dataset]
            continue
        if rows["A"] and rows["B"]:
            diff = _differs(rows["A"], rows["B"], PROVENANCE_IDENTITY)
            if diff:
                conflicts.append(f"{backbone} x {dataset}: provenance differs ({', '.join(diff)})")
                prov_conflict.add(key)
            prov_side[key] = prefer or "A"
        else:
            prov_side[key] = "A" if rows["A"] else "B"

    # saved heads: the same name must be the same head (its manifest's sha256 covers every file)
    head_side, head_shared = {}, set()
    for name in sorted(set(data["A"]["heads"]) | set(data["B"]["heads"])):
        rows = {side: data[side]["heads"].get(name) for side in SIDES}
        if rows["A"] and rows["B"]:
            if rows["A"]["manifest_sha256"] != rows["B"]["manifest_sha256"]:
                conflicts.append(f"model {name!r}: a different head in each store")
            else:
                head_shared.add(name)
            head_side[name] = prefer or "A"
        else:
            head_side[name] = "A" if rows["A"] else "B"

    # model files (e.g. PCA fits): same path must hold the same bytes; a head's files go with its model
    model_side = {}
    for rel in sorted(set(data["A"]["models"]) | set(data["B"]["models"])):
        if rel.startswith(HEADS_DIR + "/"):
            for name, side in head_side.items():
                if rel in data[side]["models"] and rel.startswith(data[side]["heads"][name]["folder"] + "/"):
                    model_side[rel] = side
            continue
        paths = {side: data[side]["models"].get(rel) for side in SIDES}
        if paths["A"] and paths["B"]:
            if sha256_file(paths["A"]) != sha256_file(paths["B"]):
                conflicts.append(f"{rel}: differs between the stores")
            model_side[rel] = prefer or "A"
        else:
            model_side[rel] = "A" if paths["A"] else "B"

    # probe runs: dropped when they used the version of a dataset or embedding left out
    run_side, dropped = {}, []
    for run_id in sorted(set(data["A"]["runs"]) | set(data["B"]["runs"])):
        rows = {side: data[side]["runs"].get(run_id) for side in SIDES}
        if rows["A"] and rows["B"] and _differs(rows["A"], rows["B"], RUN_IDENTITY):
            conflicts.append(f"probe run {run_id}: differs between the stores")
        candidates = [s for s in ((prefer or "A"), other(prefer or "A")) if rows[s]]
        for side in candidates:
            run = rows[side]
            lost = [d for d in run["datasets"] or []
                    if (d in ds_conflict and ds_side[d] != side)
                    or ((run["backbone"], d) in prov_conflict and prov_side[(run["backbone"], d)] != side)]
            if not lost:
                run_side[run_id] = side
                break
        else:
            dropped.append(f"{run_id} ({rows[candidates[0]]['backbone']}, {rows[candidates[0]]['head']})")

    if conflicts and prefer is None:
        listed = "; ".join(conflicts)
        raise UserError(f"{len(conflicts)} merge conflict{'s' if len(conflicts) > 1 else ''}: {listed}: "
                        "pass --prefer A or --prefer B to keep one side's version of each")
    for key, side in prov_side.items():
        rel = data[side]["provenance"][key]["array_path"]
        if not (stores[side].embeddings_path / rel).is_dir():
            raise UserError(f"embedding array {rel} ({key[0]} x {key[1]}) is missing from store {side} "
                            f"({stores[side].path}): the store is damaged; re-extract it (--force) first")

    warnings = _space_warnings({k: data[s]["provenance"][k] for k, s in prov_side.items()})
    check_destination(into, "the merged store")
    created = _make_parent(into)
    try:
        with work_dir(into, "merging") as work:
            staging = work / "store"
            merged = Store.create(staging)
            n_predictions = _merge_index(merged, stores, ds_side, prov_side, run_side, prefer or "A", head_side,
                                         head_shared, ds_conflict)
            for key, side in prov_side.items():
                rel = data[side]["provenance"][key]["array_path"]
                shutil.copytree(stores[side].embeddings_path / rel, merged.embeddings_path / rel)
            for rel, side in model_side.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(data[side]["models"][rel], staging / rel)
            if into.exists():
                into.rmdir()
            os.replace(staging, into)
    except BaseException as e:
        _remove_empty(created)
        code = disk_errno(e)
        if code is not None and not isinstance(e, UserError):
            raise DiskError(code, into, "writing the merged store") from None
        raise
    return MergeReport(into, sorted(ds_side), sorted({k[0] for k in prov_side}), len(run_side),
                       conflicts, dropped, warnings, models=sorted(head_side), n_predictions=n_predictions,
                       seconds=time.perf_counter() - t0)


def _space_warnings(provenance: dict) -> list[str]:
    spaces: dict[str, set] = {}
    for (backbone, _), row in provenance.items():
        params = _params(row["params"])
        spaces.setdefault(backbone, set()).add(params.get("space_id") if isinstance(params, dict) else None)
    return [f"backbone {b}: the merged datasets lie in {len(s)} feature spaces ({', '.join(sorted(map(str, s)))}), "
            f"so probes across them are refused; re-extract with --force to put them in one"
            for b, s in sorted(spaces.items()) if len(s) > 1]


def _cell_columns(con, alias: str) -> list[tuple[str, str]]:
    return con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? "
                        "AND table_name = 'cells' ORDER BY column_index", [alias]).fetchall()


def _merge_index(merged: Store, stores: dict, ds_side: dict, prov_side: dict, run_side: dict, first: str,
                 head_side: dict, head_shared: set, ds_conflict: set) -> int:
    aliases = {"A": "src_a", "B": "src_b"}
    try:
        con = duckdb.connect(str(merged.index_path))
    except duckdb.Error as e:
        raise UserError(f"cannot create {merged.index_path}: {_first_line(e)}") from None
    try:
        for side, alias in aliases.items():
            path = str(stores[side].path / INDEX)
            try:
                wait_for_index(lambda: con.execute(f"ATTACH ? AS {alias} (READ_ONLY)", [path]), stores[side].location)
            except duckdb.Error as e:
                raise UserError(f"cannot read store {side} ({stores[side].path}): {_first_line(e)}") from None
        con.execute("BEGIN TRANSACTION")
        # cells: the union of both stores' obs columns; a column typed differently becomes VARCHAR
        columns: dict[str, str] = {}
        for alias in aliases.values():
            for name, dtype in _cell_columns(con, alias):
                if name in CELL_CORE_COLUMNS:
                    continue
                columns[name] = dtype if columns.get(name, dtype) == dtype else "VARCHAR"
        for name, dtype in columns.items():
            con.execute(f'ALTER TABLE cells ADD COLUMN "{name}" {dtype}')
        order = [first, "B" if first == "A" else "A"]
        for side in order:
            alias = aliases[side]
            names = [d for d, s in ds_side.items() if s == side]
            con.execute(f"INSERT INTO datasets BY NAME SELECT * FROM {alias}.datasets WHERE list_contains(?, dataset)",
                        [names])
            con.execute(f"INSERT INTO cells BY NAME SELECT * FROM {alias}.cells WHERE list_contains(?, dataset)",
                        [names])
            keys = pd.DataFrame([k for k, s in prov_side.items() if s == side], columns=["backbone", "dataset"])
            con.register("merge_keys", keys)
            con.execute(f"INSERT INTO provenance BY NAME SELECT p.* FROM {alias}.provenance p "
                        "SEMI JOIN merge_keys k USING (backbone, dataset)")
            con.unregister("merge_keys")
            runs = [r for r, s in run_side.items() if s == side]
            con.execute(f"INSERT INTO probe_runs BY NAME SELECT * FROM {alias}.probe_runs "
                        "WHERE list_contains(?, run_id)", [runs])
            con.execute(f"INSERT INTO probe_results BY NAME SELECT * FROM {alias}.probe_results "
                        "WHERE list_contains(?, run_id)", [runs])
            if con.execute("SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND table_name = "
                           "'probe_predictions'", [alias]).fetchone():
                con.execute(f"INSERT INTO probe_predictions BY NAME SELECT * FROM {alias}.probe_predictions "
                            "WHERE list_contains(?, run_id)", [runs])
            con.execute(f"INSERT INTO zero_shot_cache BY NAME SELECT * FROM {alias}.zero_shot_cache "
                        "WHERE key NOT IN (SELECT key FROM zero_shot_cache)")
            heads = [n for n, s in head_side.items() if s == side]
            con.execute(f"INSERT INTO models BY NAME SELECT * FROM {alias}.models WHERE list_contains(?, name)",
                        [heads])
            # predictions of a kept head (from either side when both hold it), not of a dataset version left out
            usable = [n for n, s in head_side.items() if s == side or n in head_shared] + runs   # + LoRA runs
            foreign = [d for d in ds_conflict if ds_side[d] != side]
            con.execute(f"""INSERT INTO predictions BY NAME SELECT p.* FROM {alias}.predictions p
                            WHERE list_contains(?, p.model) AND NOT list_contains(?, p.dataset)
                            AND NOT EXISTS (SELECT 1 FROM predictions q WHERE q.model = p.model
                                            AND q.dataset = p.dataset AND q."row" = p."row")""",
                        [usable, foreign])
        con.execute(COHORT_VIEW)
        con.execute("INSERT INTO meta VALUES ('merged_at', ?)", [now().isoformat()])
        n_predictions = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
        con.execute("COMMIT")
        for alias in aliases.values():
            con.execute(f"DETACH {alias}")
    finally:
        con.close()
    return int(n_predictions)
