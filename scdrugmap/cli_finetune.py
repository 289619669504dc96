"""``scdrugmap finetune``: parsing and printing only; the work is in :mod:`scdrugmap.finetune`."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import SEED, echo_notes, open_store, parse_options, print_table, store_option


@click.command()
@store_option
@click.option("--backbone", required=True, help="A neural backbone with weights (see 'scdrugmap backbones').")
@click.option("--model-dir", type=click.Path(path_type=Path), help="Checkpoint directory of the backbone (required).")
@click.option("--protocol", "protocols", multiple=True, default=("pooled",), show_default=True,
              type=click.Choice(["pooled", "cross"]),
              help="pooled: the probes' 5-fold CV; cross: leave one dataset out (repeatable).")
@click.option("--group-by", default="auto", show_default=True, type=click.Choice(["auto", "sample", "patient", "none"]),
              help="Hold out whole samples/patients in pooled CV, as 'scdrugmap probe'.")
@click.option("--where", help="SQL condition on the cohort view selecting the cells.")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank r.")
@click.option("--alpha", default=8.0, show_default=True, type=float, help="LoRA alpha (scaling alpha / r).")
@click.option("--dropout", default=0.05, show_default=True, type=float, help="LoRA dropout.")
@click.option("--target-modules", "target_modules", multiple=True, default=("attention",), show_default=True,
              help="attention, mlp (the backbone's own layer lists) or module-name patterns (repeatable).")
@click.option("--epochs", default=5, show_default=True, type=int, help="Most epochs per fold (early stopping).")
@click.option("--patience", default=2, show_default=True, type=int,
              help="Epochs without a better validation loss before stopping.")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="AdamW learning rate (adapters and head).")
@click.option("--batch-size", type=int, help="Cells per forward pass (backbone default).")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Batches per optimiser step.")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Share of each training fold held out for early stopping.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the folds (as 'scdrugmap probe'), adapters and training.")
@click.option("--positive", default="resistant", show_default=True, type=click.Choice(["resistant", "sensitive"]),
              help="Positive class of F1, precision, recall.")
@click.option("--option", "options", multiple=True, metavar="NAME=VALUE", help="Backbone option (repeatable).")
@click.option("--export-embeddings", is_flag=True,
              help="Also store the fine-tuned (out-of-fold) embeddings as backbone <backbone>+lora:<run>.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of exported embeddings.")
@click.option("--force", is_flag=True, help="Retrain a run that is stored or partly done, and replace it.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-fold lines.")
def finetune(store_path, backbone, model_dir, protocols, group_by, where, rank, alpha, dropout, target_modules, epochs,
             patience, lr, batch_size, grad_accum, val_fraction, device, seed, positive, options, export_embeddings,
             dtype, force, quiet):
    """Fine-tune a backbone with LoRA and score it exactly like the frozen probes.

    LoRA adapters (peft) on the backbone's attention projections (--target-modules mlp adds the
    feed-forward layers) and the probes' MLP head on its cell embedding are trained per fold of
    the same folds 'scdrugmap probe' uses (same seed, same folds), with early stopping on a
    validation part of the training fold; the test fold is scored with the same metrics and the
    run is stored with method 'lora', beside the frozen probes in 'scdrugmap leaderboard'.
    Before training, one check proves that every adapter receives a gradient. Folds are saved
    under STORE/finetune/<run>/; rerunning the same command resumes an interrupted run. Needs
    pip install 'scdrugmap[lora]'.

    \b
    Examples:
      scdrugmap finetune --store st --backbone geneformer --model-dir gf-6L --protocol pooled
      scdrugmap finetune --store st --backbone scgpt --model-dir scgpt-human --device cuda \\
          --protocol cross --target-modules attention --target-modules mlp --epochs 3
      scdrugmap finetune --store st --backbone llm --model-dir all-MiniLM-L6-v2 --option top_k=50 \\
          --where "dataset = 'pc9'" --export-embeddings
      scdrugmap probe --store st --backbone 'llm+lora:<run>' --head lr
      scdrugmap leaderboard --store st
    """
    import pandas as pd

    from .finetune import run_finetune

    store = open_store(store_path)
    opts = parse_options(options)
    summaries, notes = [], []
    for protocol in protocols:
        run = run_finetune(store, backbone, model_dir=model_dir, protocol=protocol, group_by=group_by, where=where,
                           seed=seed, positive=positive, rank=rank, alpha=alpha, dropout=dropout,
                           target_modules=target_modules, epochs=epochs, lr=lr, batch_size=batch_size,
                           grad_accum=grad_accum, patience=patience, val_fraction=val_fraction, device=device,
                           options=opts, export_embeddings=export_embeddings, dtype=dtype, force=force,
                           show_progress=not quiet, echo=None if quiet else (lambda line: click.echo(line, err=True)))
        notes.extend(run.notes)
        summaries.append(run.summary_row())
        if export_embeddings:
            click.echo(f"fine-tuned embeddings: backbone '{backbone}+lora:{run.run_id}' "
                       f"(scdrugmap probe --backbone '{backbone}+lora:{run.run_id}')")
    echo_notes(notes)                 # each note once, however many protocols share it
    print_table(pd.DataFrame(summaries), title="LoRA fine-tuning results (mean ± std over splits)")
