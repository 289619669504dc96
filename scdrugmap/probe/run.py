"""Probe runs over a store: load a cohort, split, evaluate a head, record everything.

Reads only the store (index + embedding arrays): no torch, no source files, so a lab that
received a colleague's store can re-run and extend the evaluation.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from ..progress import progress_bar
from ..store.schema import METRIC_COLUMNS
from ..store.common import now
from ..store.store import Store
from .evaluate import evaluate_heads
from .heads import make_head
from .splits import cohort_splits, labelled_cells

PROTOCOLS = ("pooled", "cross")
COHORT_COLUMNS = ("label", "sample", "patient")      # all that splits need (besides dataset, row)


@dataclass
class ProbeRun:
    run_id: str
    backbone: str
    head: str
    protocol: str
    group_by: str
    n_cells: int
    datasets: list
    results: pd.DataFrame
    notes: list = field(default_factory=list)
    method: str = "frozen"
    params: dict = field(default_factory=dict)     # stored as probe_runs.params (JSON)
    stored: bool = True                            # False on a read-only (URL) store: printed only
    seconds: float = 0.0                           # its heads' work over all splits (summed over processes)
    load_seconds: float = 0.0                      # loading its backbone's embeddings (shared by a grid's runs)
    predictions: pd.DataFrame | None = None        # out-of-fold scores (probe_predictions rows, no run_id)

    def summary_row(self) -> dict:
        ok = self.results[self.results["status"] != "one-class-train"]
        row = {"backbone": self.backbone, "method": self.method, "head": self.head, "protocol": self.protocol,
               "group_by": self.group_by, "cells": self.n_cells, "splits": f"{len(ok)}/{len(self.results)}"}
        for metric in ("f1", "macro_f1", "auroc", "auprc", "mcc"):
            values = ok[metric].dropna()
            row[metric] = (f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"
                           if len(values) else "n/a")
        row["seconds"] = round(self.seconds, 1)
        row["run_id"] = self.run_id
        return row

    def summary_record(self) -> dict:
        """:meth:`summary_row` as numbers (mean and std of each metric in columns of their own),
        for ``--csv`` and ``--json``."""
        ok = self.results[self.results["status"] != "one-class-train"]
        row = {"backbone": self.backbone, "method": self.method, "head": self.head, "protocol": self.protocol,
               "group_by": self.group_by, "cells": self.n_cells, "splits_scored": len(ok),
               "splits": len(self.results)}
        for metric in METRIC_COLUMNS:
            values = ok[metric].dropna()
            row[metric] = float(values.mean()) if len(values) else None
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else None)
        row["seconds"] = self.seconds
        row["run_id"] = self.run_id
        row["stored"] = self.stored
        return row


def run_probe(store: Store, backbone: str, head: str = "lr", protocol: str = "pooled", group_by: str = "auto",
              where: str | None = None, seed: int = 0, positive: str = "resistant", n_splits: int = 5,
              head_params: dict | None = None, n_jobs: int = 1, show_progress: bool = True) -> ProbeRun:
    """Evaluate ``head`` on ``backbone``'s embeddings of the cells selected by ``where``; stored
    (unless the store is a read-only URL store: then ``run.stored`` is False)."""
    return run_grid(store, [backbone], [head], [protocol], group_by=group_by, where=where, seed=seed,
                    positive=positive, n_splits=n_splits, head_params={head: head_params or {}}, n_jobs=n_jobs,
                    show_progress=show_progress)[0]


def run_grid(store: Store, backbones, heads=("lr",), protocols=("pooled",), group_by: str = "auto",
             where: str | None = None, seed: int = 0, positive: str = "resistant", n_splits: int = 5,
             head_params: dict | None = None, n_jobs: int = 1, show_progress: bool = True,
             on_run=None) -> list[ProbeRun]:
    """Every ``backbone x head x protocol`` run on the cells selected by ``where``, in that order.

    What the runs share is done once: the cohort and its splits (once for all backbones), each
    backbone's embeddings (loaded once), each split's standardised rows and the cohort's
    LightGBM bins (once for all heads, :mod:`.shared`). ``head_params`` maps a head to its
    parameters. Each backbone's runs are stored as soon as they are done (``on_run(run)`` is
    called for each), so an interrupted grid keeps what it finished. Every run's results equal
    those of the same run made alone, with or without ``n_jobs``.
    """
    backbones, heads, protocols = list(dict.fromkeys(backbones)), list(dict.fromkeys(heads)), \
        list(dict.fromkeys(protocols))
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    check_seed(seed)
    params = {head: dict((head_params or {}).get(head) or {}) for head in heads}
    resolved = {head: _resolved_params(make_head(head, seed=seed, **params[head])) for head in heads}
    cells = store.cells(where, columns=COHORT_COLUMNS)
    coverage_notes = []
    if where is None:
        where, coverage_notes = covered_cohort(store, backbones, cells)
        if where is not None:
            cells = store.cells(where, columns=COHORT_COLUMNS)
    cells, selection, unlabelled_notes = labelled_cells(cells, where)
    coverage_notes += unlabelled_notes
    for backbone in backbones:                                   # a missing backbone fails before any work
        store._embedding_rows(backbone, cells)
    try:
        cohorts = {protocol: cohort_splits(cells, protocol, group_by, seed, positive, n_splits)
                   for protocol in protocols}
    except UserError as e:
        if not coverage_notes:
            raise
        covered = ", ".join(dict.fromkeys(cells["dataset"]))
        raise UserError(f"{e} (without --where, only the datasets with embeddings of every backbone asked for "
                        f"are probed: {covered})") from None
    for cohort in cohorts.values():
        cohort.notes[:0] = coverage_notes
    splits = [split for protocol in protocols for split in cohorts[protocol].splits]
    owner = [protocol for protocol in protocols for _ in cohorts[protocol].splits]
    y = cohorts[protocols[0]].y
    runs = []
    total = len(backbones) * len(heads) * len(splits)
    with progress_bar("probe", total=total, enabled=show_progress) as advance:
        for backbone in backbones:
            advance.describe(f"{backbone} · loading")
            t0 = time.perf_counter()
            X, loaded = store.load(backbone, where=selection, dtype=np.float32, columns=COHORT_COLUMNS)
            if not (loaded["dataset"].equals(cells["dataset"]) and loaded["row"].equals(cells["row"])):
                raise UserError(f"the store changed while {backbone!r} was loaded: run the probe again")
            load_seconds = time.perf_counter() - t0
            advance.describe(f"{backbone} · {', '.join(heads)} · {' + '.join(protocols)}")
            with _shared_matrix(X, n_jobs) as shared:
                del X
                records = evaluate_heads(shared, y, splits, heads, seed=seed, head_params=params, n_jobs=n_jobs,
                                         progress=lambda *_: advance(1))
            for head in heads:
                for protocol in protocols:
                    mine = [r for r, p in zip(records[head], owner) if p == protocol]
                    cohort = cohorts[protocol]
                    run = ProbeRun(uuid.uuid4().hex[:12], backbone, head, protocol, cohort.group_by, len(cells),
                                   cohort.datasets, _results_frame(mine), list(cohort.notes),
                                   params={"head": resolved[head], "n_splits": n_splits},
                                   seconds=sum(r["seconds"] for r in mine), load_seconds=load_seconds,
                                   predictions=_predictions_frame(mine, cohort.splits, cells, y))
                    if store.read_only:
                        # a URL store is read-only: the run is returned (and printed by the CLI), not stored
                        run.stored = False
                        run.notes.append(f"{store.location} is read-only ({store.read_only_reason}): results are "
                                         "shown, not stored (unpack or copy the store to keep runs in it)")
                    else:
                        _save(store, run, where, seed, positive)
                    runs.append(run)
                    if on_run is not None:
                        on_run(run)
    return runs


def covered_cohort(store: Store, backbones, cells: pd.DataFrame) -> tuple[str | None, list[str]]:
    """Without ``--where``: the datasets every backbone has embeddings of, as a condition (None
    when that is all of them) and notes naming each dataset left out, why, and how to include it.

    A backbone with no embeddings at all is left to the usual error; if no dataset is covered by
    every backbone, a one-line error says which backbone covers which."""
    from ..store.store import embeddings_advice

    prov = store.provenance()
    present = list(dict.fromkeys(cells["dataset"]))
    have = {b: prov[prov["backbone"] == b] for b in backbones}
    if any(rows.empty for rows in have.values()):
        return None, []
    keep = [d for d in present if all(d in set(rows["dataset"]) for rows in have.values())]
    if len(keep) == len(present):
        return None, []
    if not keep:
        parts = "; ".join(f"{b}: {', '.join(sorted(set(rows['dataset']) & set(present)))}" for b, rows in have.items())
        raise UserError(f"no dataset has embeddings of every backbone asked for ({parts}): probe the backbones "
                        "one at a time, or give each the embeddings it lacks")
    notes = []
    for backbone, rows in have.items():
        lacking = [d for d in present if d not in set(rows["dataset"])]
        if lacking:
            notes.append(f"backbone {backbone!r} has no embeddings of dataset(s) {', '.join(lacking)}: left out "
                         f"(to include them, {embeddings_advice(backbone, lacking, rows)})")
    where = "dataset IN (" + ", ".join("'" + d.replace("'", "''") + "'" for d in keep) + ")"
    n_kept = int(cells["dataset"].isin(keep).sum())
    notes.append(f"probed the {len(keep)} of {len(present)} datasets that "
                 f"{'every backbone covers' if len(have) > 1 else 'have these embeddings'} "
                 f"({n_kept:,} of {len(cells):,} cells); the runs are stored with --where \"{where}\"")
    return where, notes


@contextlib.contextmanager
def _shared_matrix(X: np.ndarray, n_jobs: int):
    """``X`` itself for one process; for worker processes a read-only memory map of a copy in a
    temporary file (in /dev/shm where it fits), which every worker maps instead of receiving a
    copy per split. Removed afterwards."""
    if n_jobs == 1:
        yield X
        return
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and shutil.disk_usage(shm).free > 2 * X.nbytes else None
    folder = Path(tempfile.mkdtemp(prefix="scdrugmap-probe-", dir=where))
    try:
        path = folder / "X.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=X.dtype, shape=X.shape)
        out[:] = X
        out.flush()
        del out
        yield np.load(path, mmap_mode="r")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_seed(seed) -> None:
    """Seeds go to numpy and scikit-learn, which take integers 0 <= seed < 2**32."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UserError(f"seed {seed!r} is out of range: give an integer from 0 to {2**32 - 1}")


def _resolved_params(estimator) -> dict:
    """Every parameter of the head as fitted (defaults included), for the probe_runs record."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    params = {"estimator": type(final).__name__, **final.get_params(deep=False)}
    if hasattr(estimator, "steps"):
        params["preprocessing"] = [name for name, _ in estimator.steps[:-1]]
    return json.loads(json.dumps(params, default=str))


RESULT_COLUMNS = ["split", "status", "reason", "n_train", "n_test", "n_test_positive", *METRIC_COLUMNS,
                  "fit_seconds"]


def _results_frame(records: list[dict]) -> pd.DataFrame:
    """One row per split: its status and counts beside the flattened metrics."""
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        rows.append({"split": r["split"], "status": r["status"], "reason": r.get("reason") or None,
                     "n_train": r["n_train"], "n_test": r["n_test"], "n_test_positive": r["n_test_pos"],
                     **{m: metrics.get(m, np.nan) for m in METRIC_COLUMNS}, "fit_seconds": r["fit_seconds"]})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _predictions_frame(records: list[dict], splits, cells: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    """The out-of-fold score of every held-out cell of every scored split (probe_predictions)."""
    parts = []
    for record, split in zip(records, splits):
        if record.get("proba") is None:
            continue
        idx = split.test_idx
        parts.append(pd.DataFrame({
            "split": split.name, "dataset": cells["dataset"].to_numpy()[idx],
            "row": cells["row"].to_numpy()[idx].astype(np.int32), "score": record["proba"].astype(np.float32),
            "label": np.asarray(y)[idx].astype(np.uint8)}))
    if not parts:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    return pd.concat(parts, ignore_index=True)


PREDICTION_COLUMNS = ["split", "dataset", "row", "score", "label"]


def _save(store: Store, run: ProbeRun, where, seed, positive, replace: bool = False) -> None:
    """The run and its per-split results, in one transaction (shared with ``scdrugmap zero-shot``
    and ``scdrugmap finetune``); ``replace`` first drops a stored run with the same id."""
    results = run.results[RESULT_COLUMNS].copy()
    results.insert(0, "run_id", run.run_id)
    columns = list(results.columns)
    with store.transaction() as con:
        if replace:
            con.execute("DELETE FROM probe_results WHERE run_id = ?", [run.run_id])
            con.execute("DELETE FROM probe_predictions WHERE run_id = ?", [run.run_id])
            con.execute("DELETE FROM probe_runs WHERE run_id = ?", [run.run_id])
        con.execute("INSERT INTO probe_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run.run_id, now(), run.backbone, run.head, run.method, run.protocol, run.group_by, where, seed,
                     positive, run.datasets, run.n_cells, json.dumps(run.params, sort_keys=True),
                     "; ".join(run.notes) or None, __version__])
        con.register("incoming_results", results[columns])
        names = ", ".join(f'"{c}"' for c in columns)
        con.execute(f"INSERT INTO probe_results ({names}) SELECT {names} FROM incoming_results")
        con.unregister("incoming_results")
        if run.predictions is not None and len(run.predictions):
            con.register("incoming_predictions", run.predictions[PREDICTION_COLUMNS])
            con.execute("INSERT INTO probe_predictions SELECT ?, split, dataset, \"row\", score, label "
                        "FROM incoming_predictions", [run.run_id])
            con.unregister("incoming_predictions")

