"""Per-split results of every head on the real PC9 and glioblastoma data, as computed by the
probe code *before* the probing speed-ups (``python tests/probe/expected_real.py`` rewrites
``data/expected_real.json``; it was written once, by that code, and is kept as the reference).

The cohorts: PC9 + glioblastoma together (cross: leave one dataset out; pooled: 5-fold, the
default grouping), and glioblastoma alone, pooled by patient. ``hvg`` and ``pca`` backbones.
Each split records its name, a sha256 of its test cells and its metrics.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "data" / "expected_real.json"
HEADS = ("lr", "lgbm", "mlp")
# (cohort name, --where, protocol, group_by)
COHORTS = (("both", None, "cross", "auto"), ("both", None, "pooled", "auto"),
           ("gbm", "dataset = 'gbm'", "pooled", "patient"))


def build_store(root: Path, pc9: Path, gbm: Path) -> Path:
    """The store of both datasets, its PCA fitted on one thread: the fit's last bits depend on
    the BLAS thread count, and LightGBM's thresholds can turn on them."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _build_store(root, pc9, gbm)


def _build_store(root: Path, pc9: Path, gbm: Path) -> Path:
    from scdrugmap.extract.runner import extract
    from scdrugmap.store.ingest import IngestRequest, ingest
    from scdrugmap.store.store import Store

    ingest(root, IngestRequest(file=pc9, dataset="pc9", label_col="response", sample_col="sample_id",
                               context={"drug": "erlotinib"}))
    ingest(root, IngestRequest(file=gbm, dataset="gbm", label_col="condition", sensitive=("ctrl",),
                               resistant=("panobinostat",), sample_col="sample_id", patient_col="patient_id",
                               context={"drug": "panobinostat"}))
    store = Store.open(root)
    for backbone in ("hvg", "pca"):
        extract(store, backbone, show_progress=False)
    return root


def cells_digest(cells, idx) -> str:
    keys = (cells["dataset"].to_numpy()[idx].astype(str).astype(object) + "/"
            + cells["row"].to_numpy()[idx].astype(str).astype(object))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def compute(store_dir: Path, run) -> dict:
    """``run(store, backbone, head, protocol, group_by, where)`` -> (ProbeRun, cohort splits)."""
    from scdrugmap.store.store import Store

    store = Store.open(store_dir)
    out = {}
    for backbone in ("hvg", "pca"):
        for name, where, protocol, group_by in COHORTS:
            for head in HEADS:
                results, splits, cells = run(store, backbone, head, protocol, group_by, where)
                key = f"{backbone}/{name}/{protocol}/{head}"
                out[key] = [{"split": r["split"], "status": r["status"],
                             "test_cells": cells_digest(cells, s.test_idx),
                             **{m: (None if r[m] != r[m] else round(float(r[m]), 6)) for m in ("f1", "auroc")}}
                            for (_, r), s in zip(results.iterrows(), splits)]
    return out


def current_run(store, backbone, head, protocol, group_by, where):
    from scdrugmap.probe.run import run_probe
    from scdrugmap.probe.splits import cohort_splits

    run = run_probe(store, backbone, head=head, protocol=protocol, group_by=group_by, where=where, seed=0,
                    show_progress=False)
    _, cells = store.load(backbone, where=where)
    splits = cohort_splits(cells, protocol, group_by, 0).splits
    return run.results, splits, cells


if __name__ == "__main__":
    import tempfile

    shared = HERE.parents[2] / "shared" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp) / "st", shared / "pc9_erlotinib.h5ad",
                            shared / "glioblastoma_panobinostat.h5ad")
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(compute(store, current_run), indent=1, sort_keys=True) + "\n")
    print(f"wrote {EXPECTED}", file=sys.stderr)
