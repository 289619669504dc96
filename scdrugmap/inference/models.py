"""``scdrugmap fit``: a head trained on a whole cohort, saved in the store with its provenance.

The head is one of the probes' heads (:mod:`scdrugmap.probe.heads`) with the same parameters
and seed as ``scdrugmap probe`` would use, fitted on every labelled cell the ``--where`` selects
(cells without a sensitive/resistant label are left out). Its files are written as data
(:mod:`.serialize`) into ``models/heads/<name>-<id>/`` beside a manifest with each file's
sha256, and the index's ``models`` table records the backbone's provenance of every training
dataset (checkpoint sha256, preprocessing parameters, feature space), the cohort, the seed,
the resolved parameters and the cross-validated scores of the same configuration where a probe
run exists. The folder appears whole (one rename), and only then is the index row written; a
failed write removes it, so the store is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from ..progress import progress_bar
from ..store.arrays import safe_name
from ..store.common import disk_error_or, now
from ..store.common import sha256_file
from ..store.heads import FORMAT, FORMAT_VERSION, HEADS_DIR, MANIFEST, check_head_folder, encode_manifest
from ..store.store import Store
from .serialize import SAVABLE_HEADS, load_estimator, save_estimator

LABELS = ("sensitive", "resistant")
POSITIVE = "resistant"           # a saved head gives the probability of resistance
METHOD = "frozen"
METRICS = ("f1", "macro_f1", "auroc", "auprc", "mcc", "balanced_accuracy")
PROVENANCE_KEYS = ("dataset", "array_path", "dim", "dtype", "checkpoint_sha256", "source_sha256", "params", "origin",
                   "scdrugmap_version")


@dataclass
class FittedModel:
    name: str
    backbone: str
    head: str
    n_cells: int
    n_sensitive: int
    n_resistant: int
    datasets: list
    dim: int
    folder: str
    seconds: float
    cv_scores: list
    estimator: object = None
    n_unlabelled: int = 0


def check_name(name: str) -> str:
    if not name or len(name) > 100 or not all(c.isalnum() or c in "._+:-" for c in name) or name[0] in ".-":
        raise UserError(f"invalid model name {name!r}: use letters, digits and . _ + : - (at most 100 characters, "
                        "not starting with . or -)")
    return name


def fit_model(store: Store, backbone: str, head: str = "lr", where: str | None = None, name: str | None = None,
              seed: int = 0, head_params: dict | None = None, replace: bool = False,
              show_progress: bool = True) -> FittedModel:
    """Fit ``head`` on ``backbone``'s embeddings of every labelled cell ``where`` selects; saved
    in the store as model ``name`` (default ``<backbone>-<head>``)."""
    from threadpoolctl import threadpool_limits

    from ..probe.heads import make_head
    from ..probe.run import _resolved_params, check_seed

    check_seed(seed)
    if head not in SAVABLE_HEADS:
        make_head(head, seed)                     # an unknown head: the registry's own message
        raise UserError(f"head {head!r} cannot be saved without pickle: 'scdrugmap fit' supports "
                        f"{', '.join(SAVABLE_HEADS)}")
    name = check_name(name or f"{backbone}-{head}")
    store.require_writable("saving a model")
    old = _model_row(store, name)
    if old is not None and not replace:
        raise UserError(f"model {name!r} exists (fitted {old['created_at']:%Y-%m-%d %H:%M} on {old['backbone']}, "
                        f"{old['head']}): choose another --name, or pass --replace")
    estimator = make_head(head, seed=seed, n_threads=1, **(head_params or {}))
    resolved = _resolved_params(estimator)

    t0 = time.perf_counter()
    with progress_bar(f"fit {name}", total=3, enabled=show_progress) as advance:
        advance.describe(f"{backbone} · loading")
        X, cells = store.load(backbone, where=where, dtype=np.float32, columns=("label",))
        advance(1)
        labelled = cells["label"].isin(LABELS).to_numpy()
        n_unlabelled = int((~labelled).sum())
        if n_unlabelled:
            X, cells = X[labelled], cells[labelled].reset_index(drop=True)
        y = (cells["label"].to_numpy() == POSITIVE).astype(np.int64)
        if len(y) == 0 or len(np.unique(y)) < 2:
            have = ", ".join(f"{k}: {v}" for k, v in cells["label"].value_counts().items()) or "no labelled cells"
            raise UserError(f"the selected cohort needs both sensitive and resistant cells to fit a head ({have}): "
                            "widen --where")
        advance.describe(f"{backbone} · {head} · fitting on {len(y):,} cells")
        with threadpool_limits(limits=1):
            _fit(estimator, X, y, head)
        advance(1)
        seconds = time.perf_counter() - t0
        datasets = sorted(cells["dataset"].unique())
        prov = store.provenance(backbone)
        prov = prov[prov["dataset"].isin(datasets)]
        provenance = {r["dataset"]: {k: _plain(r[k]) for k in PROVENANCE_KEYS if k != "dataset"}
                      for r in prov.to_dict("records")}
        dim = int(X.shape[1])
        cv = cv_scores(store, backbone, head, where, seed, resolved)
        folder = f"{HEADS_DIR}/{safe_name(name)}-{uuid.uuid4().hex[:8]}"
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "backbone": backbone,
                    "head": head, "method": METHOD, "positive": POSITIVE, "threshold": 0.5, "dim": dim,
                    "seed": seed, "params": resolved, "datasets": datasets, "where": where,
                    "n_cells": int(len(y)), "scdrugmap_version": __version__, "created_at": now().isoformat()}
        advance.describe(f"saving {name}")
        manifest_sha = _write_folder(store, folder, estimator, head, manifest)
        row = {"name": name, "created_at": now(), "backbone": backbone, "head": head, "method": METHOD,
               "where_sql": where, "datasets": datasets, "n_cells": int(len(y)),
               "n_sensitive": int((y == 0).sum()), "n_resistant": int(y.sum()), "seed": int(seed), "dim": dim,
               "folder": folder, "manifest_sha256": manifest_sha,
               "provenance": json.dumps(provenance, sort_keys=True, default=str),
               "params": json.dumps(resolved, sort_keys=True), "cv_scores": json.dumps(cv, sort_keys=True),
               "scdrugmap_version": __version__}
        try:
            with store.transaction() as con:
                taken = con.execute("SELECT folder FROM models WHERE name = ?", [name]).fetchone()
                if taken and (not replace or taken[0] != (old or {}).get("folder")):
                    raise UserError(f"model {name!r} was saved by another command meanwhile: choose another --name, "
                                    "or pass --replace")
                con.execute("DELETE FROM models WHERE name = ?", [name])
                cols = list(row)
                con.execute(f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            [row[c] for c in cols])
        except BaseException:
            shutil.rmtree(store.path / folder, ignore_errors=True)
            raise
        if old is not None and old["folder"] != folder:
            shutil.rmtree(store.path / old["folder"], ignore_errors=True)
        advance(1)
    return FittedModel(name, backbone, head, int(len(y)), row["n_sensitive"], row["n_resistant"], datasets, dim,
                       folder, seconds, cv, estimator, n_unlabelled)


def _fit(estimator, X, y, head: str) -> None:
    """Fit; LightGBM checks its parameters only here, so a bad --param value is a one-line error now."""
    try:
        estimator.fit(X, y)
    except Exception as e:
        from lightgbm.basic import LightGBMError

        if isinstance(e, LightGBMError):
            raise UserError(f"invalid parameter for head {head!r}: {str(e).splitlines()[0]} "
                            "(give another value with --param NAME=VALUE)") from None
        raise


def _plain(value):
    if value is None or (isinstance(value, float) and value != value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _write_folder(store: Store, folder: str, estimator, head: str, manifest: dict) -> str:
    """The head's files and manifest in a hidden folder, renamed into place; the manifest's sha256."""
    final = store.path / folder
    tmp = final.with_name(f".{final.name}.tmp")
    made = [p for p in (store.path / "models", store.path / HEADS_DIR) if not p.exists()]
    try:
        tmp.mkdir(parents=True)
        entry = save_estimator(estimator, head, tmp)
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(tmp.iterdir())}
        raw = encode_manifest({**manifest, "estimator": entry, "files": files})
        (tmp / MANIFEST).write_bytes(raw)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise disk_error_or(e, store.path / folder, "saving the model")
    return hashlib.sha256(raw).hexdigest()


def cv_scores(store: Store, backbone: str, head: str, where: str | None, seed: int, resolved: dict) -> list[dict]:
    """Mean scores over the splits of the latest probe run of each protocol and grouping with the
    same backbone, head, cohort, seed and head parameters ([] when there is none)."""
    runs = store.sql("""
        SELECT * FROM probe_runs
        WHERE backbone = ? AND head = ? AND method = 'frozen' AND coalesce(where_sql, '') = ? AND seed = ?
        ORDER BY created_at DESC""", [backbone, head, where or "", seed])
    out, seen = [], set()
    for r in runs.to_dict("records"):
        key = (r["protocol"], r["group_by"], r["positive_label"])
        try:
            same = json.loads(r["params"]).get("head") == resolved
        except (TypeError, ValueError):
            same = False
        if key in seen or not same:
            continue
        seen.add(key)
        res = store.sql(f"SELECT {', '.join(f'avg({m}) AS {m}' for m in METRICS)}, count(*) AS splits "
                        "FROM probe_results WHERE run_id = ? AND status <> 'one-class-train'", [r["run_id"]])
        scores = {m: (None if pd.isna(v) else round(float(v), 4)) for m, v in res.iloc[0][list(METRICS)].items()}
        out.append({"run_id": r["run_id"], "protocol": r["protocol"], "group_by": r["group_by"],
                    "positive": r["positive_label"], "splits": int(res.iloc[0]["splits"]),
                    "created_at": r["created_at"].isoformat(), **scores})
    return out


# ---- reading models -------------------------------------------------------------------------
def _model_row(store: Store, name: str) -> dict | None:
    frame = store.sql("SELECT * FROM models WHERE name = ?", [name])
    return None if frame.empty else frame.iloc[0].to_dict()


def model_row(store: Store, name: str) -> dict:
    row = _model_row(store, name)
    if row is None:
        names = list(store.sql("SELECT name FROM models ORDER BY name")["name"])
        raise UserError(f"no model {name!r} in this store (models: {', '.join(names) or 'none'}; or the run id of a "
                        "LoRA fine-tuning run): fit one with 'scdrugmap fit', list them with 'scdrugmap models'")
    return row


def load_model(store: Store, row: dict):
    """``(estimator, manifest)`` of a stored model, its files checked against their sha256 first."""
    manifest, problems = check_head_folder(store.path, row["folder"], row["manifest_sha256"])
    if problems:
        raise UserError(f"model {row['name']!r} is damaged ({'; '.join(problems[:3])}): fit it again "
                        "(scdrugmap fit --replace), or restore the store from its pack")
    return load_estimator(store.path / row["folder"], manifest["estimator"]), manifest


def list_models(store: Store) -> pd.DataFrame:
    """One row per saved model: what it was fitted on, and its cross-validated F1/AUROC if known."""
    frame = store.sql("SELECT * FROM models ORDER BY name")
    rows = []
    for r in frame.to_dict("records"):
        cv = json.loads(r["cv_scores"] or "[]")
        pooled = next((c for c in cv if c["protocol"] == "pooled"), cv[0] if cv else None)
        rows.append({"name": r["name"], "backbone": r["backbone"], "head": r["head"],
                     "cohort": r["where_sql"] or "all cells", "datasets": ", ".join(r["datasets"]) if len(r["datasets"]) <= 3
                     else f"{len(r['datasets'])} datasets",
                     "cells": int(r["n_cells"]), "seed": int(r["seed"]),
                     "cv": (f"{pooled['protocol']}/{pooled['group_by']} F1 {pooled['f1']:.3f} AUROC "
                            f"{pooled['auroc']:.3f}" if pooled and pooled["f1"] is not None
                            and pooled["auroc"] is not None else "no probe run"),
                     "fitted": r["created_at"].strftime("%Y-%m-%d %H:%M")})
    return pd.DataFrame(rows, columns=["name", "backbone", "head", "cohort", "datasets", "cells", "seed", "cv",
                                       "fitted"])
