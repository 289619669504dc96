"""``scdrugmap predict`` throughput in cells per second, per head and backbone.

A simulated cohort (through the real simulate -> .h5ad -> ingest -> extract path): a training
dataset and a new dataset of ``--cells`` cells, embedded with ``pca`` (50-d) and ``hvg``
(978-d). For each backbone x head (lr, lgbm, mlp) a head is fitted on the training dataset
(``fit_model``) and the whole new dataset is predicted (``predict``: provenance check, sha256
check of the head's files, embedding load, head, writing the predictions table, per-sample
and per-patient bootstrap summaries). The figure is cells / wall seconds of the whole call,
best of ``--repeat``, with its parts.

Run: ``python benchmarks/predict_bench.py [--cells 100000]``. The store is cached in ``.bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import CACHE, machine

from scdrugmap.demo import demo_genes
from scdrugmap.extract.runner import extract
from scdrugmap.inference import fit_model, predict
from scdrugmap.simulate import simulate_cohort, write_cohort
from scdrugmap.store.ingest import IngestRequest, ingest
from scdrugmap.store.store import Store

HEADS = ("lr", "lgbm", "mlp")
BACKBONES = ("pca", "hvg")


def bench_store(cells: int, train_cells: int, seed: int = 0) -> Store:
    path = CACHE / f"predict-{cells}-{train_cells}-seed{seed}"
    if (path / "built.json").exists():
        return Store.open(path / "store")
    t0 = time.perf_counter()
    cohort = simulate_cohort(n_datasets=2, cells_per_dataset=train_cells, samples_per_dataset=8,
                             genes=demo_genes(1000), seed=seed)
    big = simulate_cohort(n_datasets=1, cells_per_dataset=cells, samples_per_dataset=8, genes=demo_genes(1000),
                          seed=seed + 1)
    renamed = [("train_" + n, a, m) for n, a, m in cohort] + [("new", a, m) for _, a, m in big]
    for (name, _, _), file in zip(renamed, write_cohort(renamed, path / "data")):
        ingest(path / "store", IngestRequest(file=file, dataset=name, label_col="response", sample_col="sample_id",
                                             patient_col="patient_id"), show_progress=False)
    store = Store.open(path / "store")
    for backbone in BACKBONES:
        extract(store, backbone, show_progress=False)
    (path / "built.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return store


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000, help="cells of the new dataset")
    parser.add_argument("--train-cells", type=int, default=10_000, help="cells of each of the 2 training datasets")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    store = bench_store(args.cells, args.train_cells)
    rows = []
    for backbone in BACKBONES:
        for head in HEADS:
            name = f"bench-{backbone}-{head}"
            fit_model(store, backbone, head, where="dataset LIKE 'train_%'", name=name, replace=True,
                      show_progress=False)
            best = None
            for _ in range(args.repeat):
                r = predict(store, name, "new", show_progress=False)
                if best is None or r.seconds["total"] < best.seconds["total"]:
                    best = r
            s = best.seconds
            row = {"backbone": backbone, "head": head, "cells": len(best.cells),
                   "cells_per_s": round(len(best.cells) / s["total"]),
                   **{f"{k}_s": round(v, 3) for k, v in s.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\n| backbone | head | cells/s (whole call) | load s | head s | store s | summary s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['head']} | {r['cells_per_s']:,} | {r['load_s']} | {r['predict_s']} | "
              f"{r['store_s']} | {r['summary_s']} |")


if __name__ == "__main__":
    main()
