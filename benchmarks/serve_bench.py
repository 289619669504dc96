"""Web app benchmark (``scdrugmap serve``): page load time of the leaderboard (with and without
its bootstrap intervals) and of a run page on a simulated store of the paper's size (326,751
cells, 36 datasets), and upload-to-predictions time of the shared PC9 file (1,505 cells:
upload, ingest's checks, hvg and pca extraction, prediction with a saved logistic-regression
head), measured from the request to the finished background job, through a real server.

The store is the benchmarks' cached paper store (common.paper_store); the probe runs of
report_bench are made if absent. The upload goes to a copy, so the cached store is unchanged.

Run: ``python benchmarks/serve_bench.py [--scale 1.0] [--repeat 3]`` (``--scale 0.05`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, paper_store

sys.path.insert(0, str(ROOT / "tests" / "serve"))

from webapp import http, multipart, running, wait_job  # noqa: E402

from scdrugmap.inference import fit_model  # noqa: E402
from scdrugmap.probe.run import run_probe  # noqa: E402

PC9 = ROOT.parent / "shared" / "data" / "pc9_erlotinib.h5ad"


def timed_get(url: str, repeat: int) -> tuple[float, float, int]:
    """Seconds of the first load, the best of ``repeat`` more, and the page's size."""
    times, size = [], 0
    for _ in range(repeat + 1):
        t = time.perf_counter()
        r = http(url)
        times.append(time.perf_counter() - t)
        assert r.status == 200, (url, r.status, r.text[-300:])
        size = len(r.body)
    return times[0], min(times[1:]), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(machine(), flush=True)
    store = paper_store(args.scale)
    n_cells = int(store.sql("SELECT count(*) AS n FROM cells")["n"][0])
    if not int(store.sql("SELECT count(*) AS n FROM probe_runs")["n"][0]):
        t = time.perf_counter()
        for backbone in ("hvg", "pca"):
            run_probe(store, backbone, head="lr", protocol="pooled", group_by="patient", show_progress=False)
        run_probe(store, "pca", head="lr", protocol="cross", show_progress=False)
        run_probe(store, "pca", head="lr", protocol="pooled", group_by="none", show_progress=False)
        print(f"4 probe runs made in {time.perf_counter() - t:.0f} s", flush=True)
    n_runs = int(store.sql("SELECT count(*) AS n FROM probe_runs")["n"][0])
    run_id = store.sql("SELECT run_id FROM probe_runs WHERE protocol = 'pooled' ORDER BY created_at")["run_id"][0]
    with running(store.path) as base:
        for label, path in (("leaderboard, no intervals", "/leaderboard?bootstrap=0"),
                            ("leaderboard, 200 bootstrap replicates (default)", "/leaderboard"),
                            ("run page (splits + ROC/PR figure)", f"/runs/{run_id}"),
                            ("datasets", "/")):
            first, again, size = timed_get(f"{base}{path}", args.repeat)
            print(f"{n_cells:,} cells, {n_runs} runs: {label}: first load {first:.2f} s, again {again:.2f} s "
                  f"(best of {args.repeat}), {size / 1e3:.0f} kB", flush=True)
    if not PC9.exists():
        print("PC9 not found at ../shared: upload timing skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(store.path, copy)
        from scdrugmap.store.store import Store

        t = time.perf_counter()
        fit_model(Store.open(copy), "pca", "lr", name="pca-lr", show_progress=False)
        print(f"fit pca-lr on {n_cells:,} cells: {time.perf_counter() - t:.1f} s", flush=True)
        with running(copy, allow_writes=True, upload_dir=Path(tmp) / "up") as base:
            body, headers = multipart({"dataset": "pc9", "label_col": "response", "sample_col": "sample_id",
                                       "model": "pca-lr"}, "file", "pc9.h5ad", PC9.read_bytes())
            t = time.perf_counter()
            r = http(f"{base}/upload", data=body, headers=headers)
            assert r.status == 303, r.text[-400:]
            accepted = time.perf_counter() - t
            status = wait_job(base, r.headers["Location"], limit=3600)
            total = time.perf_counter() - t
            assert status["state"] == "done", status
            print(f"PC9 upload to predictions (1,505 cells, {PC9.stat().st_size / 1e6:.1f} MB): {total:.1f} s "
                  f"(upload + checks + ingest {accepted:.1f} s; extraction of hvg and pca and prediction "
                  f"{status['seconds']:.1f} s in the background)", flush=True)
            print(json.dumps(status), flush=True)


if __name__ == "__main__":
    main()
