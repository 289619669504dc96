"""``scdrugmap demo``: the whole pipeline on a simulated cohort, in under a minute on 2 cores.

simulate (4 datasets, patients and samples, a response signal plus batch effects) ->
ingest -> extract the baselines -> probe pooled (patient-grouped) and cross-dataset with
three heads -> leaderboard. Uses only the public API, so it doubles as an example.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .errors import UserError
from .extract.panel import load_panel
from .extract.runner import extract
from .probe.leaderboard import leaderboard, leaderboard_sections
from .probe.run import run_probe
from .simulate import default_genes, simulate_cohort, write_cohort
from .store.ingest import IngestRequest, ingest
from .store.store import Store


def demo_genes(n_genes: int = 2000) -> list[str]:
    """The hvg panel genes first (so baselines see them), then other real symbols."""
    genes = list(load_panel().symbols)
    seen = set(genes)
    for g in default_genes(n_genes + len(genes)):
        if len(genes) >= n_genes:
            break
        if g not in seen:
            genes.append(g)
            seen.add(g)
    return genes


# written into every demo output folder: only a folder holding it (and nothing but what the
# demo writes) is replaced by the next demo
MARKER = ".scdrugmap-demo"
DEMO_ENTRIES = {MARKER, "data", "store", "report.html"}


def _prepare_out(out: Path) -> None:
    """Make ``out`` an empty folder: refuse one that holds anything but an earlier demo's output."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a new folder, or an earlier demo's output folder")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if entries and (MARKER not in entries or not entries <= DEMO_ENTRIES):
            raise UserError(f"--out {out} is not empty and is not an earlier demo's output: choose a new folder "
                            "(the demo replaces its own output only)")
        for name in entries:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("output of 'scdrugmap demo'; the next demo with this --out replaces this folder\n")


def run_demo(out: Path, seed: int = 0, echo=print, table=None) -> Store:
    out = Path(out)
    _prepare_out(out)
    start = time.perf_counter()
    echo(f"1/5 simulating 4 datasets x 600 cells into {out / 'data'}")
    cohort = simulate_cohort(n_datasets=4, cells_per_dataset=600, samples_per_dataset=6, genes=demo_genes(),
                             seed=seed)
    files = write_cohort(cohort, out / "data")
    echo("2/5 ingesting")
    for (name, _, meta), path in zip(cohort, files):
        r = ingest(out / "store", IngestRequest(
            file=path, dataset=name, label_col="response", sample_col="sample_id", patient_col="patient_id",
            context={k: meta.get(k) for k in ("drug", "cancer_type", "tissue", "therapy", "regimen")}))
        echo(f"    {name}: {r.n_cells} cells ({r.n_sensitive} sensitive, {r.n_resistant} resistant), "
             f"{meta.get('cancer_type')}, {meta.get('drug')}")
    store = Store.open(out / "store")
    echo("3/5 extracting baselines hvg, pca")
    for backbone in ("hvg", "pca"):
        extract(store, backbone, show_progress=False)
    echo("4/5 probing (pooled, grouped by patient; cross = leave one dataset out)")
    for backbone in ("hvg", "pca"):
        for head in ("lr", "lgbm", "mlp"):
            for protocol in ("pooled", "cross"):
                run_probe(store, backbone, head=head, protocol=protocol, seed=seed, show_progress=False)
    # the same cohort split by cell: the report's leakage gap
    run_probe(store, "pca", head="lr", protocol="pooled", group_by="none", seed=seed, show_progress=False)
    echo("5/5 leaderboard")
    board = leaderboard(store, metric="f1")
    for heading, part in leaderboard_sections(board):
        title = f"Leaderboard by F1 (resistant = positive): {heading}"
        if table is not None:
            table(part.drop(columns=["run_id"]), title=title)
        else:
            echo(title)
            echo(part.to_string(index=False))
    from .report import build_report

    info = build_report(store, out / "report.html", show_progress=False)
    echo(f"report: {out / 'report.html'} ({info['figures']} figures, {info['bytes'] / 1e6:.1f} MB)")
    echo(f"done in {time.perf_counter() - start:.0f} s. Explore: scdrugmap query --store {out / 'store'} "
         "\"SELECT * FROM probe_runs\"")
    return store
