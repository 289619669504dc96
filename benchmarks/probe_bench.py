"""Probe-grid benchmark on a simulated store of the paper's size (326,751 cells, 36 datasets).

Times the full grid the paper runs for frozen embeddings: each backbone x head, pooled
5-fold CV (grouped by patient) plus leave-one-dataset-out over the 36 datasets, through
``run_grid``, what ``scdrugmap probe`` calls (results are stored as usual). It prints:

1. the grid now, per (backbone, head, protocol): fitting seconds (summed over splits and
   processes), splits, mean F1 and AUROC; then the grid's wall time;
2. with ``--compare`` (default at ``--scale`` < 1), the same grid run by the *previous*
   implementation (the package as of commit ``--before``, taken from git into a temporary
   folder and run in a subprocess on the same store, run by run as it ran them), its times
   side by side, and the largest difference of any split's F1 and AUROC between the two;
3. with ``--scaling``, grid time and load time at 10, 25, 50 and 100 % of the cells (a
   ``hash(obs_name)`` selection) and the exponent of a power-law fit (1 = linear);
4. with ``--floor``, what the heads themselves cost: one single-threaded fit of each head on a
   pooled fold's training cells (80 %), times the grid's number of fits, over the cores: the
   wall time no scheduling can beat without changing what the heads compute.

Run: ``python benchmarks/probe_bench.py [--scale 1.0] [--jobs 2] [--backbone hvg --backbone pca]
[--head lr --head lgbm --head mlp] [--compare/--no-compare] [--scaling]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import ROOT, machine, paper_store

from scdrugmap.probe.run import run_grid

BEFORE = "42d9623"          # the last commit before the probing speed-ups
PROTOCOLS = ("pooled", "cross")

# run by the previous implementation in a subprocess: one run_probe per (backbone, head, protocol)
OLD_GRID = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from scdrugmap.probe.run import run_probe
from scdrugmap.store.store import Store
store = Store.open(sys.argv[2])
spec = json.loads(sys.argv[3])
out, start = [], time.perf_counter()
for backbone in spec["backbones"]:
    for head in spec["heads"]:
        for protocol in ("pooled", "cross"):
            t = time.perf_counter()
            run = run_probe(store, backbone, head=head, protocol=protocol, group_by=spec["group_by"][protocol],
                            where=spec["where"], n_jobs=spec["jobs"], show_progress=False)
            out.append({"backbone": backbone, "head": head, "protocol": protocol, "seconds": time.perf_counter() - t,
                        "splits": run.results[["split", "f1", "auroc"]].to_dict("records")})
import scdrugmap
assert scdrugmap.__file__.startswith(sys.argv[1]), scdrugmap.__file__
print(json.dumps({"runs": out, "total": time.perf_counter() - start}))
"""


def group_by(protocol: str) -> str:
    return "patient" if protocol == "pooled" else "auto"


def new_grid(store, backbones, heads, jobs, where=None):
    """Run the grid now (one run_grid per protocol, as the grouping differs); rows and wall seconds."""
    start = time.perf_counter()
    runs = []
    for protocol in PROTOCOLS:
        runs += run_grid(store, backbones, heads, [protocol], group_by=group_by(protocol), where=where,
                         n_jobs=jobs, show_progress=False)
    wall = time.perf_counter() - start
    return runs, wall


def old_grid(store, backbones, heads, jobs, before: str, where=None):
    """The same grid by the implementation as of ``before``; None if git cannot give it."""
    with tempfile.TemporaryDirectory(prefix="scdrugmap-before-") as tmp:
        archive = Path(tmp) / "old.tar"
        r = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), before, "scdrugmap"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"(no comparison: git archive {before} failed: {r.stderr.strip()})")
            return None
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        spec = {"backbones": backbones, "heads": heads, "jobs": jobs, "where": where,
                "group_by": {p: group_by(p) for p in PROTOCOLS}}
        env = {**os.environ, "PYTHONPATH": tmp}
        r = subprocess.run([sys.executable, "-c", OLD_GRID, tmp, str(store.path), json.dumps(spec)],
                           capture_output=True, text=True, env=env, cwd=tmp)
        if r.returncode != 0:
            raise SystemExit(f"the previous implementation failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def rows_of(runs) -> list[dict]:
    rows = []
    for run in runs:
        ok = run.results[run.results["status"] != "one-class-train"]
        rows.append({"backbone": run.backbone, "head": run.head, "protocol": run.protocol,
                     "splits": len(run.results), "seconds": round(run.seconds, 1),
                     "f1": round(ok["f1"].mean(), 4), "auroc": round(ok["auroc"].mean(), 4)})
    return rows


def largest_difference(runs, old) -> tuple[float, str]:
    worst, where = 0.0, ""
    by_key = {(r["backbone"], r["head"], r["protocol"]): r for r in old["runs"]}
    for run in runs:
        before = by_key[(run.backbone, run.head, run.protocol)]["splits"]
        for (_, new), prev in zip(run.results.iterrows(), before):
            assert new["split"] == prev["split"]
            for metric in ("f1", "auroc"):
                a, b = new[metric], prev[metric]
                if a is None or b is None or a != a or b != b:
                    continue
                if abs(a - b) > worst:
                    worst, where = abs(a - b), f"{run.backbone}/{run.head}/{run.protocol}/{new['split']} {metric}"
    return worst, where


def scaling(store, backbones, heads, jobs):
    print("\n3. scaling: the same grid on a share of the cells (WHERE hash(obs_name) % 100 < share)")
    points = []
    for share in (10, 25, 50, 100):
        where = None if share == 100 else f"hash(obs_name) % 100 < {share}"
        t = time.perf_counter()
        X, cells = store.load(backbones[0], where=where)
        load = time.perf_counter() - t
        del X
        runs, wall = new_grid(store, backbones, heads, jobs, where=where)
        points.append((len(cells), load, wall))
        print(f"   {share:>3} %: {len(cells):>8,} cells  load {backbones[0]} {load:6.2f} s  grid {wall:7.1f} s",
              flush=True)
    n = np.log([p[0] for p in points])
    for name, col in (("grid", 2), ("load", 1)):
        slope = np.polyfit(n, np.log([p[col] for p in points]), 1)[0]
        print(f"   {name} time ~ cells^{slope:.2f}")


def floor(store, backbones, heads, cores: int):
    from threadpoolctl import threadpool_limits

    from scdrugmap.probe.heads import make_head
    from scdrugmap.probe.shared import CohortData

    print(f"\n4. the heads' own cost: one fit on 80 % of the cells, one thread; x 41 fits / {cores} cores")
    total = 0.0
    for backbone in backbones:
        X, cells = store.load(backbone, dtype=np.float32, columns=["label"])
        y = (cells["label"] == "resistant").to_numpy().astype(np.int64)
        order = np.random.default_rng(0).permutation(len(y))
        train, test = np.sort(order[: int(0.8 * len(y))]), np.sort(order[int(0.8 * len(y)):])
        data = CohortData(X, y)
        z_train, _ = data.standardized(train, test)
        for head in heads:
            estimator = make_head(head, 0, 1)
            with threadpool_limits(limits=1):
                t = time.perf_counter()
                if hasattr(estimator, "steps"):
                    estimator.steps[-1][1].fit(z_train, y[train])
                else:
                    estimator.fit(X[train], y[train])
                secs = time.perf_counter() - t
            grid = secs * 41 / cores
            total += grid
            print(f"   {backbone:>4} {head:>5}: {secs:6.1f} s per fit ({len(train):,} x {X.shape[1]}); "
                  f"41 fits on {cores} cores >= {grid:6.0f} s", flush=True)
        del X, data
    print(f"   the grid's floor: {total:.0f} s ({total / 60:.1f} min)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=2, help="splits fitted in parallel processes")
    ap.add_argument("--backbone", action="append", dest="backbones")
    ap.add_argument("--head", action="append", dest="heads")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the previous implementation (default: at --scale < 1)")
    ap.add_argument("--before", default=BEFORE, help="commit of the previous implementation")
    ap.add_argument("--scaling", action="store_true", help="grid and load time at 10/25/50/100 %% of the cells")
    ap.add_argument("--floor", action="store_true", help="one single-threaded fit per head: the grid's floor")
    ap.add_argument("--skip-grid", action="store_true", help="only the sections asked for (--floor, --scaling)")
    args = ap.parse_args()
    backbones = args.backbones or ["hvg", "pca"]
    heads = args.heads or ["lr", "lgbm", "mlp"]
    compare = args.compare if args.compare is not None else args.scale < 1

    store = paper_store(scale=args.scale)
    n_cells = int(store.sql("SELECT count(*) n FROM cells")["n"][0])
    print(f"machine: {machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"store: {n_cells:,} cells, {len(store.dataset_names())} datasets; jobs={args.jobs}\n", flush=True)

    if args.floor:
        floor(store, backbones, heads, args.jobs)
    if args.skip_grid:
        if args.scaling:
            scaling(store, backbones, heads, args.jobs)
        return
    runs, wall = new_grid(store, backbones, heads, args.jobs)
    rows = rows_of(runs)
    print("1. the grid now (seconds: fitting time summed over splits and processes)")
    print(pd.DataFrame(rows).to_string(index=False))
    fits = sum(r["splits"] for r in rows)
    print(f"   full grid now: {len(rows)} runs, {fits} fits, {wall:.1f} s wall ({wall / 60:.2f} min)", flush=True)

    if compare:
        old = old_grid(store, backbones, heads, args.jobs, args.before)
        if old is not None:
            print(f"\n2. the previous implementation ({args.before}) on the same store, same run")
            table = pd.DataFrame(rows)[["backbone", "head", "protocol", "splits"]]
            before = {(r["backbone"], r["head"], r["protocol"]): r["seconds"] for r in old["runs"]}
            table["before: run wall (s)"] = [round(before[(r["backbone"], r["head"], r["protocol"])], 1)
                                             for r in rows]
            table["now: fitting, all processes (s)"] = [r["seconds"] for r in rows]
            print(table.to_string(index=False))
            worst, where = largest_difference(runs, old)
            print(f"   grid wall time: before {old['total']:.1f} s, now {wall:.1f} s: "
                  f"{old['total'] / wall:.2f}x faster")
            print(f"   largest difference of any split's F1 or AUROC: {worst:.6f} ({where or 'none'})")
    print(f"   load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.scaling:
        scaling(store, backbones, heads, args.jobs)


if __name__ == "__main__":
    main()
