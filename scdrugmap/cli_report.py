"""``scdrugmap compare`` and ``scdrugmap report``: parsing and printing only; the work is in
:mod:`scdrugmap.probe.confidence` and :mod:`scdrugmap.report`."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import SEED, open_store, print_table, store_option


@click.command()
@store_option
@click.argument("run_a")
@click.argument("run_b")
@click.option("--metric", default="f1", show_default=True, help="Metric to compare.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(1), help="Bootstrap replicates.")
@click.option("--ci-seed", default=0, show_default=True, type=SEED, help="Seed of the bootstrap.")
def compare(store_path, run_a, run_b, metric, bootstrap, ci_seed):
    """Is run A really better than run B? A paired test on the same splits and cells.

    The difference of the metric gets a 95 % paired bootstrap interval (the same cells, or
    whole samples/patients when the runs' splits were grouped, drawn for both runs), and the
    per-split differences a sign test and a Wilcoxon signed-rank test. Runs on different
    cells or splits are refused as not comparable. Run ids are in 'scdrugmap leaderboard'.

    \b
    Examples:
      scdrugmap compare --store st 3f2a9c1e0b7d 8e41d0a2c6f9
      scdrugmap compare --store st 3f2a9c1e0b7d 8e41d0a2c6f9 --metric auroc --bootstrap 2000
    """
    from .probe.confidence import compare_runs

    result = compare_runs(open_store(store_path), run_a, run_b, metric=metric, n=bootstrap, seed=ci_seed)
    print_table(result.per_split, title=f"{metric} per split (A = {run_a}, B = {run_b})", floatfmt="{:.4f}")
    for line in result.lines():
        click.echo(line)


@click.command()
@store_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write (self-contained: opens without a network).")
@click.option("--metric", default="f1", show_default=True, help="Metric of the leaderboard and matrices.")
@click.option("--bootstrap", default=200, show_default=True, type=click.IntRange(1),
              help="Bootstrap replicates of the leaderboard's intervals.")
@click.option("--ci-seed", default=0, show_default=True, type=SEED, help="Seed of the bootstrap.")
@click.option("--map-cells", default=3000, show_default=True, type=click.IntRange(10),
              help="Most cells per embedding map (a seeded subsample of larger cohorts).")
@click.option("--map-seed", default=0, show_default=True, type=SEED, help="Seed of the maps' subsample.")
@click.option("--map", "map_method", type=click.Choice(["auto", "umap", "pca"]), default="auto", show_default=True,
              help="Embedding maps: UMAP (needs scdrugmap[umap]), PCA, or auto (UMAP where installed).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def report(store_path, out, metric, bootstrap, ci_seed, map_cells, map_seed, map_method, quiet):
    """Write one self-contained HTML report of the store's results.

    Leaderboard with 95 % bootstrap intervals, ROC and precision-recall curves per backbone
    and head, the cross-dataset matrix, the leakage gap (grouped vs cell-level splits), a 2-D
    map of each backbone's embeddings (UMAP with scdrugmap[umap], else PCA), datasets,
    provenance, and per-patient predictions where 'scdrugmap predict' stored some.

    \b
    Examples:
      scdrugmap report --store st --out report.html
      scdrugmap report --store st --out report.html --metric auroc --map-cells 5000
      scdrugmap report --store st --out report.html --map pca
    """
    from .report import build_report

    info = build_report(open_store(store_path), out, metric=metric, n_bootstrap=bootstrap, ci_seed=ci_seed,
                        map_cells=map_cells, map_seed=map_seed, map_method=map_method,
                        show_progress=not quiet)
    click.echo(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB, {info['figures']} figures, {info['seconds']:.1f} s)")
