"""Probe-grid benchmark on a simulated store of the paper's size (326,751 cells, 36 datasets).

Times the full grid the paper runs for frozen embeddings: each backbone x head, pooled
5-fold CV (grouped by patient) plus leave-one-dataset-out over the 36 datasets, through
the same ``run_probe`` that ``scdrugmap probe`` calls (results are stored as usual).

Run: ``python benchmarks/probe_bench.py [--scale 1.0] [--jobs 2] [--backbone hvg --backbone pca]
[--head lr --head lgbm --head mlp]``.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from common import machine, paper_store

from scdrugmap.probe.run import leaderboard, run_probe


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=2, help="splits fitted in parallel processes")
    ap.add_argument("--backbone", action="append", dest="backbones")
    ap.add_argument("--head", action="append", dest="heads")
    args = ap.parse_args()
    backbones = args.backbones or ["hvg", "pca"]
    heads = args.heads or ["lr", "lgbm", "mlp"]

    store = paper_store(scale=args.scale)
    n_cells = int(store.sql("SELECT count(*) n FROM cells")["n"][0])
    print(f"machine: {machine()}")
    print(f"store: {n_cells:,} cells, {len(store.dataset_names())} datasets; jobs={args.jobs}\n", flush=True)
    rows = []
    start = time.perf_counter()
    for backbone in backbones:
        for head in heads:
            for protocol in ("pooled", "cross"):
                t = time.perf_counter()
                run = run_probe(store, backbone, head=head, protocol=protocol, group_by="patient" if protocol ==
                                "pooled" else "auto", n_jobs=args.jobs, show_progress=False)
                secs = time.perf_counter() - t
                ok = run.results[run.results["status"] != "one-class-train"]
                rows.append({"backbone": backbone, "head": head, "protocol": protocol, "splits": len(run.results),
                             "seconds": round(secs, 1), "f1": round(ok["f1"].mean(), 3),
                             "auroc": round(ok["auroc"].mean(), 3)})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    total = time.perf_counter() - start
    fits = sum(r["splits"] for r in rows)
    print(f"\nfull grid: {len(rows)} runs, {fits} fits, {total:.0f} s ({total / 60:.1f} min) on {n_cells:,} cells")
    print(leaderboard(store).drop(columns=["run_id", "cohort"]).head(12).to_string(index=False))


if __name__ == "__main__":
    main()
