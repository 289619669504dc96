"""Shared by the benchmarks: a simulated store of the paper's size, built once and cached.

The store is built through the real pipeline (simulate -> .h5ad -> ingest -> extract), so
the figures describe what a user's store of that size does.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scdrugmap.demo import demo_genes  # noqa: E402
from scdrugmap.extract.runner import extract  # noqa: E402
from scdrugmap.simulate import simulate_paper_collection  # noqa: E402
from scdrugmap.store.ingest import IngestRequest, ingest  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

CACHE = Path(os.environ.get("SCDRUGMAP_BENCH_DIR", ROOT / ".bench"))


def machine() -> str:
    cpus = os.cpu_count()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {cpus} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def paper_store(scale: float = 1.0, n_genes: int = 1000, seed: int = 0, backbones=("hvg", "pca")) -> Store:
    """The primary collection (36 datasets, 326,751 cells at scale 1) as a store with baselines."""
    path = CACHE / f"paper-s{scale}-g{n_genes}-seed{seed}"
    marker = path / "built.json"
    if marker.exists():
        return Store.open(path / "store")
    t0 = time.perf_counter()
    data = path / "data"
    data.mkdir(parents=True, exist_ok=True)
    genes = demo_genes(n_genes)
    for name, adata, meta in simulate_paper_collection(scale=scale, genes=genes, seed=seed):
        file = data / f"{name}.h5ad"
        adata.write_h5ad(file)
        ingest(path / "store", IngestRequest(
            file=file, dataset=name, label_col="response", sample_col="sample_id", patient_col="patient_id",
            context={k: meta.get(k) for k in ("drug", "cancer_type", "tissue", "therapy", "regimen")}))
        print(f"  built {name}: {adata.n_obs:,} cells", flush=True)
    store = Store.open(path / "store")
    for backbone in backbones:
        extract(store, backbone, show_progress=False)
    marker.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return store
