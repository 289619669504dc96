"""``scdrugmap fit``, ``models`` and ``predict``: parsing and printing only; the work is in
:mod:`scdrugmap.inference`."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import (SEED, check_output_file, echo_notes, open_store, parse_options, print_table, save_csv,
                         store_option)


@click.command()
@store_option
@click.option("--backbone", required=True, help="Backbone whose stored embeddings the head is fitted on.")
@click.option("--head", default="lr", show_default=True, help="lr, lgbm or mlp (the probes' heads).")
@click.option("--where", help="SQL condition on the cohort view selecting the training cells.")
@click.option("--name", help="Name of the model in the store (default: <backbone>-<head>).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the head (as 'scdrugmap probe').")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Head parameter (repeatable; numbers and true/false are parsed).")
@click.option("--replace", is_flag=True, help="Replace a model of the same name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit(store_path, backbone, head, where, name, seed, params, replace, quiet):
    """Fit a head on every labelled cell of a cohort and save it in the store.

    The head is saved as data (arrays, LightGBM's text model; never a pickle) with its
    provenance: the backbone's checkpoint and preprocessing for each training dataset, the
    cohort, seed, resolved parameters, and the cross-validated scores of the same
    configuration when 'scdrugmap probe' ran it. Cells without a label are left out.

    \b
    Examples:
      scdrugmap probe --store st --backbone pca --head lr          # its CV scores are kept
      scdrugmap fit --store st --backbone pca --head lr --name pca-lr
      scdrugmap fit --store st --backbone hvg --head lgbm --where "therapy = 'Targeted therapy'"
      scdrugmap models --store st
    """
    from .inference import fit_model

    head_params = {k: _value(v) for k, v in parse_options(params, "--param").items()}
    m = fit_model(open_store(store_path), backbone, head, where=where, name=name, seed=seed, head_params=head_params,
                  replace=replace, show_progress=not quiet)
    if m.n_unlabelled:
        click.echo(f"note: {m.n_unlabelled:,} selected cells without a sensitive/resistant label were left out",
                   err=True)
    cv = next((c for c in m.cv_scores if c["protocol"] == "pooled"), m.cv_scores[0] if m.cv_scores else None)
    cv_text = (f"; cross-validated ({cv['protocol']}, {cv['group_by']}, run {cv['run_id']}): F1 {cv['f1']:.3f}, "
               f"AUROC {cv['auroc']:.3f}" if cv and cv["f1"] is not None and cv["auroc"] is not None
               else "; no probe run of this configuration (run 'scdrugmap probe' for its CV scores)")
    click.echo(f"model {m.name}: {m.head} on {m.backbone} ({m.dim} features), {m.n_cells:,} cells "
               f"({m.n_sensitive:,} sensitive, {m.n_resistant:,} resistant) of {', '.join(m.datasets)}, "
               f"fitted in {m.seconds:.1f} s{cv_text}")


def _value(text: str):
    import json

    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


@click.command()
@store_option
def models(store_path):
    """List the models saved by 'scdrugmap fit'.

    \b
    Examples:
      scdrugmap models --store st
      scdrugmap query --store st "SELECT name, provenance, cv_scores FROM models"
    """
    from .inference import list_models

    frame = list_models(open_store(store_path))
    if frame.empty:
        click.echo("no models yet: fit one with 'scdrugmap fit --store ... --backbone ... --head ...'")
        return
    print_table(frame, title="Models")


@click.command()
@store_option
@click.option("--model", "model_name", required=True,
              help="A model saved by 'scdrugmap fit', or the run id of a LoRA run ('scdrugmap finetune').")
@click.option("--dataset", required=True, help="The dataset to predict (ingested and extracted with the model's backbone).")
@click.option("--where", help="SQL condition on the cohort view: only these cells of the dataset.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the bootstrap intervals.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the per-cell predictions as CSV.")
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the per-cell predictions as Parquet.")
@click.option("--summary-csv", "summary_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the per-sample and per-patient summary as CSV.")
@click.option("--model-dir", type=click.Path(path_type=Path),
              help="LoRA runs only: the checkpoint the run was fine-tuned from.")
@click.option("--device", default="cpu", show_default=True, help="LoRA runs only: cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(1), help="LoRA runs only: cells per forward pass.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(store_path, model_name, dataset, where, seed, csv_path, parquet_path, summary_path, model_dir, device,
            batch_size, quiet):
    """Probability of resistance per cell of a dataset, and per sample and patient.

    Per cell, the probability and the call (resistant at probability >= 0.5) are stored in
    the predictions table; per sample and per patient, the mean probability with a bootstrap
    95 % interval (cells resampled, seeded), the fraction called resistant and the number of
    cells are printed. Refused when the dataset's embeddings were made with another
    checkpoint or preprocessing than the model's training embeddings. Labels are not needed.

    A LoRA run (its run id as --model) embeds the dataset's cells again with each fold's
    adapters (--model-dir: the checkpoint it was fine-tuned from) and averages its folds' heads.

    \b
    Examples:
      scdrugmap predict --store st --model pca-lr --dataset new_patient
      scdrugmap predict --store st --model pca-lr --dataset gbm --where "patient = 'P3'" --csv p3.csv
      scdrugmap predict --store st --model 3f2a9c1b7d4e --model-dir gf-6L --dataset new_patient
      scdrugmap query --store st "SELECT call, count(*) FROM predictions GROUP BY ALL"
    """
    from .inference import predict as run_predict

    def check_outputs():                      # after the model's checks, before anything is stored
        for p in (csv_path, parquet_path, summary_path):
            check_output_file(p)

    result = run_predict(open_store(store_path), model_name, dataset, where=where, seed=seed,
                         show_progress=not quiet, check_outputs=check_outputs, model_dir=model_dir,
                         device=device, batch_size=batch_size)
    echo_notes(result.notes)
    save_csv(result.cells, csv_path)
    if parquet_path:
        result.cells.to_parquet(parquet_path, index=False)
    save_csv(result.summary, summary_path)
    for level in ("dataset", "patient", "sample"):
        part = result.summary[result.summary["level"] == level].drop(columns="level")
        if len(part) and not (level != "dataset" and len(part) == 1 and part["group"].iloc[0] == "(none)"):
            print_table(part.rename(columns={"group": level}),
                        title=f"Predicted resistance per {level} (mean probability, bootstrap 95 % interval)")
    n = len(result.cells)
    rate = n / result.seconds["total"] if result.seconds["total"] > 0 else float("inf")
    where_to = "stored in the predictions table" if result.stored else "not stored"
    click.echo(f"{n:,} cells of {dataset} predicted by {model_name} in {result.seconds['total']:.2f} s "
               f"({rate:,.0f} cells/s), {where_to}", err=True)
