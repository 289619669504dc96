"""Report benchmark: ``scdrugmap report`` build time and file size on the demo store and on a
simulated store of the paper's size (326,751 cells, 36 datasets), and the size of the stored
out-of-fold scores (``probe_predictions``) at that scale.

On the paper store it runs, if not yet stored, the logistic-regression probe on hvg and pca
(pooled 5-fold CV grouped by patient), on pca the leave-one-dataset-out protocol and a
cell-level split (so the report has every section), then measures how much the index grew
per stored score, and builds the report.

Each report is built with PCA maps, and again with UMAP maps where ``umap-learn`` is installed.

Run: ``python benchmarks/report_bench.py [--scale 1.0] [--skip-paper]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, paper_store

from scdrugmap.demo import run_demo
from scdrugmap.probe.run import run_probe
from scdrugmap.report import build_report


def _map_methods() -> list[str]:
    """PCA maps always; UMAP maps too where scdrugmap[umap] is installed (same store, same run)."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return ["pca"]
    return ["pca", "umap"]


def _report(store, out: Path, label: str) -> None:
    for method in _map_methods():
        t = time.perf_counter()
        info = build_report(store, out, map_method=method, show_progress=False)
        print(f"{label}, {method} maps: report built in {time.perf_counter() - t:.1f} s, {info['bytes'] / 1e6:.2f} MB, "
              f"{info['figures']} figures", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = run_demo(Path(tmp) / "demo", echo=lambda *_: None)
        _report(store, Path(tmp) / "demo.html", "demo store (2,400 cells, 13 runs)")
        if args.skip_paper:
            return
        store = paper_store(args.scale)
        n_cells = int(store.sql("SELECT count(*) AS n FROM cells")["n"][0])
        index = store.index_path
        if not int(store.sql("SELECT count(*) AS n FROM probe_predictions")["n"][0]):
            before = index.stat().st_size
            t = time.perf_counter()
            for backbone in ("hvg", "pca"):
                run_probe(store, backbone, head="lr", protocol="pooled", group_by="patient", show_progress=False)
            run_probe(store, "pca", head="lr", protocol="cross", show_progress=False)
            run_probe(store, "pca", head="lr", protocol="pooled", group_by="none", show_progress=False)
            rows = int(store.sql("SELECT count(*) AS n FROM probe_predictions")["n"][0])
            grown = index.stat().st_size - before
            print(f"paper store ({n_cells:,} cells): 4 probe runs in {time.perf_counter() - t:.0f} s stored "
                  f"{rows:,} out-of-fold scores; index grew {grown / 1e6:.1f} MB = {grown / rows:.2f} bytes per "
                  f"score ({grown / 4 / 1e6:.1f} MB per run of every cell)", flush=True)
        _report(store, Path(tmp) / "paper.html", f"paper store ({n_cells:,} cells)")


if __name__ == "__main__":
    main()
