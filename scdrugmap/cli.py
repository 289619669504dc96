"""The ``scdrugmap`` command line: parsing and printing only; the work is in the package."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._version import __version__
from .cli_common import (SEED, Main, check_output_file, echo_notes, emit_table, open_store, output_options,
                         parse_options, print_json, print_table, save_csv, store_option, verbose_option)
from .cli_finetune import finetune
from .cli_predict import fit, models, predict
from .cli_report import compare, report
from .cli_serve import serve
from .cli_store import export, import_embeddings, store_group
from .store.constants import DEFAULT_CHUNK_ROWS


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scdrugmap")
def main():
    """Single-cell drug-response prediction with foundation-model embeddings.

    Extract embeddings once into a store (DuckDB index + Zarr arrays), then probe any
    cohort you can write as SQL, on any machine, without a GPU.

    \b
    Typical use:
      scdrugmap ingest pc9.h5ad --store st --dataset pc9 --label-col response
      scdrugmap extract --store st --backbone pca
      scdrugmap probe --store st --backbone pca --head lr --protocol pooled
      scdrugmap leaderboard --store st
    """


# ---- ingest ---------------------------------------------------------------------------------
@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@store_option
@click.option("--dataset", required=True, help="Name of the dataset in the store.")
@click.option("--label-col", help="obs column with the response label (leave out: cells unlabelled; cells with an "
              "empty value stay unlabelled).")
@click.option("--sensitive", multiple=True, help="Label value meaning sensitive (repeatable).")
@click.option("--resistant", multiple=True, help="Label value meaning resistant (repeatable).")
@click.option("--sample-col", help="obs column with the sample id.")
@click.option("--patient-col", help="obs column with the patient id.")
@click.option("--values", type=click.Choice(["normalized", "log1p", "scaled"]),
              help="Say the matrix is not raw counts: scaled for z-scored values (negative allowed). Only hvg/pca "
                   "read non-count values; backbones that need counts refuse them.")
@click.option("--layer", help="Read this layer instead of X (e.g. counts). Default: X when it holds counts, else "
              "a 'counts' layer or .raw holding counts.")
@click.option("--use-raw", is_flag=True, help="Read .raw (scanpy's adata.raw) instead of X.")
@click.option("--symbol-col", help="var column with gene symbols (auto-detected).")
@click.option("--drug")
@click.option("--cancer-type")
@click.option("--tissue")
@click.option("--therapy")
@click.option("--regimen")
@click.option("--replace", is_flag=True, help="Re-ingest an existing dataset (drops its embeddings and results).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ingest(file, store_path, dataset, label_col, sensitive, resistant, sample_col, patient_col, values, layer,
           use_raw, symbol_col, drug, cancer_type, tissue, therapy, regimen, replace, quiet):
    """Validate FILE (.h5ad) and register its cells in the store (created if absent).

    Genes (var_names) may be symbols, Ensembl IDs or NCBI Gene (Entrez) IDs; Entrez IDs get
    their symbols and Ensembl IDs from the HGNC table shipped with the package.

    FILE may also be an .h5ad with no genes, or a .csv/.tsv of cells (first column: cell
    names): an embeddings-only dataset, served by 'scdrugmap import-embeddings'.

    \b
    Examples:
      scdrugmap ingest pc9.h5ad --store st --dataset pc9 --label-col response --sample-col sample_id
      scdrugmap ingest gbm.h5ad --store st --dataset gbm --label-col condition \\
          --sensitive ctrl --resistant panobinostat --patient-col patient_id --drug panobinostat
      scdrugmap ingest zscored.h5ad --store st --dataset z --label-col response --values scaled
      scdrugmap ingest lognorm.h5ad --store st --dataset ln --label-col response --use-raw
      scdrugmap ingest new_cells.h5ad --store st --dataset new
      scdrugmap ingest cells.csv --store st --dataset api --label-col response
    """
    from .store.ingest import IngestRequest
    from .store.ingest import ingest as do_ingest

    req = IngestRequest(file=file, dataset=dataset, label_col=label_col, sensitive=sensitive, resistant=resistant,
                        sample_col=sample_col, patient_col=patient_col, values=values, layer=layer,
                        use_raw=use_raw, symbol_col=symbol_col, replace=replace,
                        context={"drug": drug, "cancer_type": cancer_type, "tissue": tissue, "therapy": therapy,
                                 "regimen": regimen})
    r = do_ingest(store_path, req, show_progress=not quiet)
    verb = "replaced" if r.replaced else "ingested"
    for note in r.notes:
        click.echo(f"note: {note}")
    unlabelled = f", {r.n_unlabelled:,} unlabelled" if r.n_unlabelled else ""
    click.echo(f"{verb} {r.dataset}: {r.n_cells:,} cells ({r.n_sensitive:,} sensitive, {r.n_resistant:,} resistant"
               f"{unlabelled}), {r.n_genes:,} gene{'' if r.n_genes == 1 else 's'} ({r.gene_id_type}), "
               f"values: {r.value_kind}")
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)


# ---- extract --------------------------------------------------------------------------------
@main.command()
@store_option
@click.option("--backbone", "backbones", multiple=True, required=True, help="Backbone name (repeatable).")
@click.option("--dataset", "datasets", multiple=True, help="Dataset (repeatable; default: all).")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Checkpoint directory of the backbone.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch-size", type=int, help="Cells per forward pass (backbone default).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the embeddings.")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE", help="Backbone option (repeatable).")
@click.option("--chunk-rows", type=click.IntRange(1), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="Rows per Zarr chunk (the resume unit).")
@click.option("--force", is_flag=True, help="Re-extract datasets that already have embeddings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract(store_path, backbones, datasets, model_dir, device, batch_size, dtype, options, chunk_rows, force,
            quiet):
    """Embed every cell of the selected datasets with each backbone.

    Already-extracted datasets are skipped unless --force; an interrupted run resumes
    from its last written chunk. Under torchrun the processes share the chunks (one GPU
    each) and rank 0 updates the index.

    \b
    Examples:
      scdrugmap extract --store st --backbone hvg --backbone pca
      scdrugmap extract --store st --backbone pca --dataset pc9 --option n_components=30 --force
      torchrun --nproc-per-node 8 --no-python scdrugmap extract --store st --backbone geneformer \\
          --model-dir gf-12L --device cuda
    """
    from .extract.runner import extract as run_extract

    store = open_store(store_path)
    opts = parse_options(options)
    for name in backbones:
        for r in run_extract(store, name, datasets=list(datasets), model_dir=model_dir, device=device,
                             batch_size=batch_size, force=force, dtype=dtype, options=opts, chunk_rows=chunk_rows,
                             show_progress=not quiet):
            ranks = f"rank {r.rank} of {r.world_size}: " if r.world_size > 1 else ""
            if r.status == "skipped":
                if r.rank == 0:
                    click.echo(f"{name} · {r.dataset}: already extracted (use --force to redo)")
            elif r.status == "shard":
                click.echo(f"{ranks}{name} · {r.dataset}: computed {r.computed_chunks} chunks", err=True)
            else:
                resumed = f", resumed after {r.resumed_chunks} chunks" if r.resumed_chunks else ""
                shared = f" ({r.world_size} processes; rank 0 computed {r.computed_chunks} chunks)" \
                    if r.world_size > 1 else ""
                click.echo(f"{name} · {r.dataset}: {r.n_cells:,} cells x {r.dim} ({dtype}){resumed}{shared}")


@main.command()
def backbones():
    """List registered backbones: dimension, what they need, whether they can run here.

    \b
    Example:
      scdrugmap backbones
    """
    import pandas as pd

    from .extract.registry import all_backbones

    rows = []
    for name, cls in all_backbones().items():
        ok, why = cls.availability()
        needs = ["weights (--model-dir)"] if cls.needs_weights else []
        needs += list(cls.requires)
        rows.append({"backbone": name, "dim": cls.dim_hint(), "needs": ", ".join(needs) or "-",
                     "counts only": "yes" if cls.needs_counts else "no", "runs here": why if not ok else "yes",
                     "what": cls.summary})
    print_table(pd.DataFrame(rows), title="Backbones")


# ---- query ----------------------------------------------------------------------------------
@main.command()
@store_option
@click.argument("sql")
@output_options(json_help="Print every row as JSON on stdout instead of the table.")
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a Parquet file.")
@click.option("--max-rows", default=50, show_default=True, help="Rows printed in the table (files and --json get "
                                                                 "all).")
@verbose_option
def query(store_path, sql, csv_path, as_json, parquet_path, max_rows):
    """Run one read-only SQL SELECT on the store's index.

    Tables: datasets, cells, provenance, probe_runs, probe_results, zero_shot_cache, models, predictions;
    view cohort (cells with their dataset's drug, cancer_type, tissue, therapy, regimen).

    \b
    Examples:
      scdrugmap query --store st "SELECT dataset, label, count(*) FROM cohort GROUP BY ALL"
      scdrugmap query --store st "SELECT * FROM provenance" --csv provenance.csv
      scdrugmap query --store st "SELECT * FROM probe_runs" --json
      scdrugmap query --store s3://bucket/st "SELECT dataset, n_cells FROM datasets" --verbose
    """
    store = open_store(store_path)
    frame = store.sql(sql)
    save_csv(frame, csv_path)
    if parquet_path:
        frame.to_parquet(parquet_path, index=False)
    if as_json:
        print_json(frame)
        return
    print_table(frame.head(max_rows))
    if len(frame) > max_rows:
        click.echo(f"... {len(frame) - max_rows:,} more rows ({len(frame):,} in all)")


# ---- probe ----------------------------------------------------------------------------------
@main.command()
@store_option
@click.option("--backbone", "backbones", multiple=True, required=True, help="Backbone (repeatable).")
@click.option("--head", "heads", multiple=True, default=("lr",), show_default=True,
              help="Classification head: lr, lgbm, mlp or a registered one (repeatable).")
@click.option("--protocol", "protocols", multiple=True, default=("pooled",), show_default=True,
              type=click.Choice(["pooled", "cross"]),
              help="pooled: 5-fold CV over the cohort; cross: leave one dataset out (repeatable).")
@click.option("--group-by", default="auto", show_default=True,
              type=click.Choice(["auto", "sample", "patient", "none"]),
              help="Hold out whole samples/patients in pooled CV; auto: patient, else sample, else none.")
@click.option("--where", help="SQL condition on the cohort view selecting the cells.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of splits and heads.")
@click.option("--positive", default="resistant", show_default=True, type=click.Choice(["resistant", "sensitive"]),
              help="Positive class of F1, precision, recall.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
              help="Splits fitted in parallel processes (one thread each).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@output_options
@verbose_option
def probe(store_path, backbones, heads, protocols, group_by, where, seed, positive, jobs, quiet, csv_path, as_json):
    """Train heads on stored embeddings and score them (CPU only, no torch needed).

    Every run is stored (probe_runs, probe_results); the same seed gives the same results.
    On a store opened by URL (read-only) the results are printed, not stored.

    Without --where, a backbone that has embeddings of only some datasets is probed on those
    (with several backbones: on the datasets all of them cover, so the runs compare); a note
    names each dataset left out and how to include it. With --where, every selected dataset
    must have the embeddings.

    \b
    Examples:
      scdrugmap probe --store st --backbone pca --head lr --head lgbm --protocol pooled
      scdrugmap probe --store https://host/st --backbone pca --where "dataset = 'gbm'" --verbose
      scdrugmap probe --store st --backbone hvg --protocol cross --where "therapy = 'Targeted therapy'"
      scdrugmap probe --store st --backbone pca --group-by none   # the paper's cell-level split
      scdrugmap probe --store st --backbone pca --head lr --head mlp --csv probe.csv --quiet
    """
    import time

    import pandas as pd

    from .probe.run import run_grid

    check_output_file(csv_path)
    store = open_store(store_path)
    start = time.perf_counter()
    runs = run_grid(store, backbones, heads, protocols, group_by=group_by, where=where, seed=seed, positive=positive,
                    n_jobs=jobs, show_progress=not quiet)
    wall = time.perf_counter() - start
    echo_notes(note for run in runs for note in run.notes)
    emit_table(pd.DataFrame([run.summary_record() for run in runs]), title="Probe results (mean ± std over splits)",
               csv_path=csv_path, as_json=as_json, table=pd.DataFrame([run.summary_row() for run in runs]))
    loads = ", ".join(f"{run.backbone} {run.load_seconds:.1f} s" for run in {r.backbone: r for r in runs}.values())
    fits = sum(len(run.results) for run in runs)
    click.echo(f"{len(runs)} run(s), {fits} fits in {wall:.1f} s (--jobs {jobs}); embeddings loaded: {loads}; "
               "seconds = each run's fitting time summed over its splits", err=True)


@main.command()
@store_option
@click.option("--metric", default="f1", show_default=True,
              help="Metric to rank by: f1, macro_f1, auroc, auprc, accuracy, balanced_accuracy, mcc, precision, "
                   "recall.")
@click.option("--protocol", type=click.Choice(["pooled", "cross", "zero-shot"]), help="Only this protocol.")
@click.option("--where", "where_runs", help="SQL condition on probe_runs (e.g. \"head = 'lr'\").")
@click.option("--all-runs", is_flag=True, help="Every stored run, with its date (default: the latest run of each "
                                               "configuration, seed included).")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0),
              help="Bootstrap replicates for 95 % intervals of the metric (0: none; e.g. 1000).")
@click.option("--ci-seed", default=0, show_default=True, type=SEED, help="Seed of the bootstrap.")
@output_options
@verbose_option
def leaderboard(store_path, metric, protocol, where_runs, all_runs, bootstrap, ci_seed, csv_path, as_json):
    """Backbones x heads ranked by a metric (latest run of each configuration).

    One table per cohort (the runs' --where) and protocol, each ranked on its own: runs on
    other cells or under another protocol are not comparable. A configuration is backbone,
    method, head, protocol, grouping, cohort and seed: runs with different seeds are listed
    side by side (column seed), and a rerun with the same seed replaces the earlier one
    (--all-runs lists them all). Cell-level (leaky) splits are marked.

    Zero-shot runs (scdrugmap zero-shot) appear with backbone gpt-zero-shot and the
    model as head.

    \b
    Examples:
      scdrugmap leaderboard --store st
      scdrugmap leaderboard --store st --metric auroc --protocol cross
      scdrugmap leaderboard --store st --protocol zero-shot
      scdrugmap leaderboard --store st --bootstrap 1000 --ci-seed 0
      scdrugmap leaderboard --store st --all-runs --where "backbone = 'pca'" --csv runs.csv
      scdrugmap leaderboard --store st --json > leaderboard.json
    """
    from .probe.leaderboard import LEAKY_NOTE, leaderboard_sections
    from .probe.leaderboard import leaderboard as board

    store = open_store(store_path)
    frame = board(store, metric=metric, protocol=protocol, where=where_runs, all_runs=all_runs)
    if bootstrap:
        from .probe.confidence import add_intervals
        frame = add_intervals(store, frame, metric, n=bootstrap, seed=ci_seed)
    save_csv(frame, csv_path)
    if as_json:
        print_json(frame)
    else:
        for heading, part in leaderboard_sections(frame):
            print_table(part, title=f"Leaderboard by {metric}: {heading}")
    if (frame["leaky"] == "yes").any():
        echo_notes([LEAKY_NOTE])


# ---- zero-shot ------------------------------------------------------------------------------
@main.command("zero-shot")
@store_option
@click.option("--where", help="SQL condition on the cohort view selecting the cells.")
@click.option("--dataset", "datasets", multiple=True, help="Dataset (repeatable; default: all).")
@click.option("--model", default="gpt-4o-mini", show_default=True, help="Model name at the endpoint.")
@click.option("--base-url", envvar="OPENAI_BASE_URL", show_envvar=True,
              help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: api.openai.com).")
@click.option("--api-key", envvar="OPENAI_API_KEY", show_envvar=True,
              help="API key (prefer the environment variable: command lines end up in shell histories).")
@click.option("--top-n", default=10, show_default=True, type=click.IntRange(1),
              help="Highest-expressed genes listed per cell.")
@click.option("--cells-per-request", default=10, show_default=True, type=click.IntRange(1),
              help="Cells per prompt (the paper's 10); a dataset's last request may hold fewer.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the cell order before batching.")
@click.option("--positive", default="resistant", show_default=True, type=click.Choice(["resistant", "sensitive"]),
              help="Positive class of F1, precision, recall.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1), help="Requests in parallel.")
@click.option("--max-cells", default=500, show_default=True, type=click.IntRange(0),
              help="Ask before sending more uncached cells than this.")
@click.option("--yes", is_flag=True, help="Send without asking, however many cells.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0),
              help="Retries of a request after 429, 5xx or a connection error.")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Seconds before the first retry; doubled at each further one.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds to wait for one answer.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def zero_shot(store_path, where, datasets, model, base_url, api_key, top_n, cells_per_request, seed, positive,
              concurrency, max_cells, yes, retries, retry_delay, timeout, quiet):
    """Ask a chat model to call each cell sensitive or resistant (scDrugMap's GPT zero-shot).

    Each request holds the top genes of up to 10 cells of one dataset and the dataset's
    drug, cancer type and tissue; the answer {res:1,0,...} (1 = sensitive) is scored with the
    probe metrics, one split per dataset, and stored as a run with protocol zero-shot.
    Answers are cached in the store: a rerun sends nothing. Needs the openai package
    (pip install 'scdrugmap[zeroshot]'); any OpenAI-compatible server works.

    \b
    Examples:
      export OPENAI_API_KEY=...
      scdrugmap zero-shot --store st --dataset pc9 --where "row % 10 = 0"
      scdrugmap zero-shot --store st --where "cancer_type = 'Glioblastoma'" --max-cells 5000
      scdrugmap zero-shot --store st --base-url http://localhost:8000/v1 --model Qwen2.5-7B-Instruct --yes
      scdrugmap leaderboard --store st --protocol zero-shot
      scdrugmap leaderboard --store st --bootstrap 1000 --ci-seed 0
    """
    from .zeroshot import run_zero_shot

    if yes:
        def confirm(message):
            return True
    elif sys.stdin.isatty():
        def confirm(message):
            return click.confirm(message, default=False, err=True)
    else:
        confirm = None
    run = run_zero_shot(open_store(store_path), where=where, datasets=list(datasets), model=model,
                        base_url=base_url, api_key=api_key, top_n=top_n, cells_per_request=cells_per_request,
                        seed=seed, positive=positive, concurrency=concurrency, max_cells=max_cells,
                        confirm=confirm, retries=retries, retry_delay=retry_delay, timeout=timeout,
                        show_progress=not quiet)
    echo_notes(run.notes)
    columns = ["split", "status", "n_test", "f1", "macro_f1", "auroc", "accuracy", "mcc", "reason"]
    frame = run.results[columns].rename(columns={"split": "dataset", "n_test": "cells scored"})
    print_table(frame, title=f"Zero-shot {model} (hard 0/1 answers, so AUROC = balanced accuracy)")
    mean = run.summary_row()
    click.echo(f"mean over {len(frame)} dataset(s): F1 {mean['f1']}, AUROC {mean['auroc']}, MCC {mean['mcc']} "
               f"(run {run.run_id}, in 'scdrugmap leaderboard --protocol zero-shot')")


# ---- simulate -------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--paper", is_flag=True, help="Mirror the paper's primary collection (36 datasets, 326,751 cells).")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="With --paper: fraction of the paper's cell counts.")
@click.option("--datasets", "n_datasets", default=4, show_default=True, type=click.IntRange(1),
              help="Without --paper: number of datasets.")
@click.option("--cells", "cells_per_dataset", default=500, show_default=True, type=click.IntRange(8),
              help="Without --paper: cells per dataset.")
@click.option("--genes", "n_genes", default=2000, show_default=True, type=click.IntRange(1000),
              help="Genes per cell (the hvg panel's genes come first).")
@click.option("--seed", default=0, show_default=True, type=SEED)
def simulate(out, paper, scale, n_datasets, cells_per_dataset, n_genes, seed):
    """Write a simulated drug-response cohort as .h5ad files plus catalog.csv.

    Raw negative-binomial counts with sample/patient batch effects and a response signal;
    obs has response, sample_id, patient_id. catalog.csv holds each dataset's drug,
    cancer type, tissue, therapy and regimen, ready for 'scdrugmap ingest'.

    \b
    Examples:
      scdrugmap simulate sim --datasets 6 --cells 1000
      scdrugmap simulate paper --paper --scale 0.1
    """
    import pandas as pd

    from .demo import demo_genes
    from .simulate import simulate_cohort, simulate_paper_collection

    genes = demo_genes(n_genes)
    cohort = (simulate_paper_collection(scale=scale, genes=genes, seed=seed) if paper else
              simulate_cohort(n_datasets=n_datasets, cells_per_dataset=cells_per_dataset,
                              samples_per_dataset=4, genes=genes, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, adata, meta in cohort:
        adata.write_h5ad(out / f"{name}.h5ad")
        rows.append({"dataset": name, "file": f"{name}.h5ad", "cells": adata.n_obs,
                     **{k: meta.get(k) for k in ("drug", "cancer_type", "tissue", "therapy", "regimen")}})
        click.echo(f"{name}: {adata.n_obs:,} cells")
    pd.DataFrame(rows).to_csv(out / "catalog.csv", index=False)
    click.echo(f"wrote {len(rows)} datasets ({sum(r['cells'] for r in rows):,} cells) and catalog.csv to {out}")


# ---- demo -----------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="New folder for the simulated files and the store (an earlier demo's output is replaced).")
@click.option("--seed", default=0, show_default=True, type=SEED)
def demo(out, seed):
    """Simulate a cohort, then ingest -> extract -> probe -> leaderboard, in under a minute.

    \b
    Example:
      scdrugmap demo --out demo-out
    """
    from .demo import run_demo

    run_demo(out, seed=seed, echo=click.echo, table=print_table)


main.add_command(finetune)
main.add_command(fit)
main.add_command(models)
main.add_command(predict)
main.add_command(compare)
main.add_command(report)
main.add_command(serve)
main.add_command(store_group)   # store info/pack/verify/unpack/merge/migrate
main.add_command(export)
main.add_command(import_embeddings)

if __name__ == "__main__":       # python -m scdrugmap.cli
    main()
