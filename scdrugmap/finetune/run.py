"""``scdrugmap finetune``: LoRA fine-tuning of a backbone, scored exactly like the frozen probes.

One run = one backbone x one protocol over a cohort. It uses the probes' own code for the cohort,
the labels and the folds (:func:`~scdrugmap.probe.splits.cohort_splits`: the same cohort and
seed give the same folds as ``scdrugmap probe``), the probes' metrics
(:func:`~scdrugmap.probe.metrics.score`), and stores the run in ``probe_runs``/``probe_results``
with ``method = 'lora'`` and ``head = 'mlp'`` (the probes' MLP architecture, see
:mod:`.train`), so the leaderboard lists it beside the frozen probes of the same backbone.

Per fold: fresh adapters (the same seeded initialisation for every fold) and a fresh head are
trained on the training part, with early stopping on a validation part carved out of it; the
test part is scored once, at the end. The folds are saved under
``DIR/finetune/<run_id>/fold-<k>/``: ``adapter/`` (peft's ``save_pretrained`` format),
``head.safetensors``, ``split.npz`` (the cohort positions of the fit, validation and test cells) and
``provenance.json``, and the folder appears (one rename) only when all of it is written.

**Run id and resume.** The run id is a hash of everything that determines the result: the
backbone, its checkpoint's sha256 and options, the cohort (``--where``, its datasets and their
source files' sha256), the protocol, grouping, seed, positive class, and every LoRA and training
setting. Rerunning the same command therefore finds the same folder: folds that are done are
loaded and scored instead of retrained, so an interrupted run restarts from its last saved
fold. A run already stored is reported as it is (``--force`` retrains it and replaces it).

**Exported embeddings** (``export_embeddings=True``): backbone ``<backbone>+lora:<run_id>``,
every cell of the cohort's datasets, written through the store's crash-safe staged arrays, with
a provenance row per dataset. The embedding is **out-of-fold**: each cell of the cohort is
embedded by the adapter of the fold whose *test* part held it, so no cell's embedding comes from
an adapter trained on its own label (cross-fitting). A probe on these embeddings is then not
inflated by the fine-tuning having seen the cells it is tested on; the price is that the folds'
adapters give slightly different spaces (they share their initialisation and move little from the
frozen model). Cells of those datasets outside the cohort are embedded by fold 1's adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import UserError
from ..extract import registry
from ..extract.engine import TorchBackbone
from ..extract.runner import _sources
from ..probe.metrics import score
from ..probe.run import PROTOCOLS, RESULT_COLUMNS, ProbeRun, _results_frame, _save
from ..probe.splits import GROUP_BY_CHOICES, cohort_splits, labelled_cells
from ..progress import progress_bar
from ..store import arrays
from ..store.common import sha256_file
from ..store.locks import job_lock
from ..store.store import Store, commit_staged, now
from . import adapters
from .data import CohortCells, evaluation_batches, loader, validation_split
from .train import HIDDEN, STATS_CELLS, TrainSettings, embed, make_head, predict, standardisation, train_fold

METHOD = "lora"
HEAD = "mlp"
FOLDER = "finetune"
HEAD_FILE = "head.safetensors"
CHECK_CELLS = 4               # cells of the gradient check's batch


def run_finetune(store: Store, backbone: str, model_dir=None, protocol: str = "pooled", group_by: str = "auto",
                 where: str | None = None, seed: int = 0, positive: str = "resistant", n_splits: int = 5,
                 rank: int = 8, alpha: float = 8.0, dropout: float = 0.05, target_modules=("attention",),
                 epochs: int = 5, lr: float = 5e-4, batch_size: int | None = None, grad_accum: int = 1,
                 patience: int = 2, val_fraction: float = 0.1, device: str = "cpu", options: dict | None = None,
                 export_embeddings: bool = False, dtype: str = "float16", force: bool = False,
                 show_progress: bool = True, echo=None) -> ProbeRun:
    """Fine-tune ``backbone`` with LoRA under ``protocol`` and score it like the probes; stored.

    ``echo`` (optional) receives one line per fold. Bad input raises :class:`UserError` before
    anything is written.
    """
    echo = echo or (lambda line: None)
    _check_args(protocol, group_by, rank, alpha, dropout, epochs, lr, batch_size, grad_accum, patience,
                val_fraction, dtype, n_splits)
    cls = registry.get(backbone)
    if not (issubclass(cls, TorchBackbone) and cls.needs_weights):
        raise UserError(f"backbone {backbone!r} has no weights to fine-tune ({cls.summary or 'a baseline'}): LoRA needs "
                        "a neural backbone with a checkpoint, e.g. geneformer, scgpt or llm (see 'scdrugmap backbones')")
    ok, why = cls.availability()
    if not ok:
        raise UserError(f"backbone {backbone!r} cannot run here: {why}")
    adapters.require_peft()
    if model_dir is None:
        raise UserError(f"backbone {backbone!r} needs weights: pass --model-dir pointing at its checkpoint")
    store.require_writable("finetune")

    # cohort, labels and folds: the probes' code
    cells = store.cells(where)
    if cells.empty:
        raise UserError(f"store {store.path} has no cells yet: run 'scdrugmap ingest' first")
    cells, _, unlabelled_notes = labelled_cells(cells, where)
    cohort = cohort_splits(cells, protocol, group_by, seed, positive, n_splits)
    cohort.notes[:0] = unlabelled_notes
    for split in cohort.splits:
        train = cohort.y[split.train_idx]
        if len(np.unique(train)) < 2:
            only = positive if len(train) and train[0] == 1 else _other(positive)
            raise UserError(f"fold {split.name!r} has only {only!r} cells in its training part, so no classifier "
                            f"can be trained: select datasets with both classes (or widen --where)"
                            + (", or use --protocol pooled" if protocol == "cross" else ""))
    sources = {s.name: s for s in _sources(store, cohort.datasets)}
    # one fine-tuning of a backbone at a time: its runs' folders and exported embeddings are its own
    try:
        with job_lock(store.path, f"finetune-{arrays.safe_name(backbone)}",
                      f"'scdrugmap finetune --backbone {backbone}'"):
            return _run(store, cls, backbone, model_dir, protocol, group_by, where, seed, positive, n_splits, rank,
                        alpha, dropout, target_modules, epochs, lr, batch_size, grad_accum, patience, val_fraction,
                        device, options, export_embeddings, dtype, force, show_progress, echo, cells, cohort,
                        sources)
    finally:
        for source in sources.values():
            source.close()


def _run(store, cls, backbone, model_dir, protocol, group_by, where, seed, positive, n_splits, rank, alpha,
         dropout, target_modules, epochs, lr, batch_size, grad_accum, patience, val_fraction, device, options,
         export_embeddings, dtype, force, show_progress, echo, cells, cohort, sources) -> ProbeRun:
    import torch

    cls.check_values(sources.values())
    batch = batch_size or cls.finetune_batch_size or cls.default_batch_size
    model = cls(model_dir=model_dir, device=device, batch_size=batch, options=options)
    sha = model.checkpoint_sha256()                  # once: some backbones hash the weights on every call
    workers = int(model.config.get("workers", 0) or 0)
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch, grad_accum=grad_accum, patience=patience,
                             workers=workers)
    targets, patterns = adapters.resolve_targets(model, target_modules)
    lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules),
            "patterns": patterns, "targets": targets}
    key = _run_key(model, sha, backbone, store, cohort, cells, where, protocol, group_by, seed, positive, n_splits,
                   lora, settings, val_fraction)
    run_id = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    run_dir = store.path / FOLDER / run_id
    stored = _stored_run(store, run_id)
    if stored is not None and not force:
        stored.notes.append(f"run {run_id} is already complete (same backbone, checkpoint, cohort and settings): "
                            "shown as stored; --force retrains it")
        if export_embeddings:
            _export(store, model, sha, None, run_id, run_dir, cells, cohort, sources, dtype, lora, settings,
                    force, show_progress, echo)
        return stored

    data = CohortCells(model, sources, cells)                      # gene matching errors come here
    peft_model = adapters.attach(model, targets, rank, alpha, dropout, seed)
    initial = adapters.adapter_state(peft_model)
    first = np.sort(cohort.splits[0].train_idx)[:CHECK_CELLS]
    check_batch = next(iter(loader(data, evaluation_batches(first, data.lengths, CHECK_CELLS),
                                   model.finetune_collate())))
    check = adapters.check_gradients(model, peft_model, check_batch, targets)
    echo(f"LoRA on {len(targets)} modules of {backbone} ({adapters.adapter_summary(peft_model)['adapter_parameters']:,} "
         f"adapter parameters): gradient check passed")

    # nothing was written before this point: a bad input leaves the store as it was
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".fold-*.tmp"):                       # an interrupted fold's partial files
        shutil.rmtree(stale, ignore_errors=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "key": key, "gradient_check": check,
                                                  "created_at": now().isoformat()}, indent=1, default=str))
    base = {"run_id": run_id, "backbone": backbone, "model_dir": str(model_dir),
            "checkpoint_sha256": sha, "protocol": protocol, "group_by": cohort.group_by,
            "where": where, "seed": seed, "positive": positive, "lora": lora,
            "lora_config": adapters.config_facts(peft_model), **adapters.adapter_summary(peft_model),
            "training": settings.as_dict(), "val_fraction": val_fraction, "gradient_check": check,
            "head": _head_facts(model.dim), "scdrugmap_version": __version__, "torch_version": torch.__version__,
            "peft_version": _version("peft")}
    records, reports = [], []
    k_total = len(cohort.splits)
    for k, split in enumerate(cohort.splits, start=1):
        fold_dir = run_dir / f"fold-{k}"
        t0 = time.perf_counter()
        if (fold_dir / "done").is_file():
            head = _load_fold(peft_model, model, fold_dir)
            report, how = json.loads((fold_dir / "provenance.json").read_text())["training_report"], "loaded"
        else:
            head, report = _train_fold(model, peft_model, initial, data, cohort, cells, split, k, fold_dir, run_dir,
                                       settings, val_fraction, seed, base, show_progress)
            how = "trained"
        proba = predict(model, head, data, split.test_idx, settings.batch_size, workers)
        record = _record(split, cohort.y, proba, time.perf_counter() - t0 if how == "trained" else report["seconds"])
        records.append(record)
        reports.append({"fold": k, "split": split.name, "how": how, **{key_: report[key_] for key_ in
                        ("epochs_run", "best_epoch", "samples_per_s", "seconds")}})
        f1 = record["metrics"]["f1"]
        echo(f"fold {k}/{k_total} ({split.name}): {how}"
             + (f", {report['epochs_run']} epochs (best {report['best_epoch']}), "
                f"{report['samples_per_s']:.1f} cells/s" if how == "trained" else "")
             + f"; test F1 {f1:.3f} on {record['n_test']} cells")
    params = {"head": _head_facts(model.dim), "n_splits": n_splits, "lora": lora,
              "lora_config": adapters.config_facts(peft_model), "training": settings.as_dict(),
              "val_fraction": val_fraction, "checkpoint_sha256": sha,
              "backbone_params": _jsonable(model.params()), "gradient_check": check, "folds": reports,
              "artefacts": f"{FOLDER}/{run_id}", **adapters.adapter_summary(peft_model)}
    run = ProbeRun(run_id, backbone, HEAD, protocol, cohort.group_by, len(cells), cohort.datasets,
                   _results_frame(records), list(cohort.notes), method=METHOD, params=params)
    _save(store, run, where, seed, positive, replace=stored is not None)
    if export_embeddings:
        _export(store, model, sha, peft_model, run_id, run_dir, cells, cohort, sources, dtype, lora, settings,
                force, show_progress, echo)
    return run


# -- one fold ---------------------------------------------------------------------------------
def _train_fold(model, peft_model, initial, data, cohort, cells, split, k, fold_dir, run_dir, settings, val_fraction,
                seed, base, show_progress):
    import torch
    from safetensors.torch import save_file

    fold_seed = _fold_seed(seed, split.name)
    adapters.load_adapter_state(peft_model, initial)            # every fold starts from the same adapters
    train = np.asarray(split.train_idx)
    fit_pos, val_pos, how = validation_split(cohort.y[train], _validation_groups(cohort, cells, train),
                                             val_fraction, fold_seed)
    fit_idx, val_idx = train[fit_pos], train[val_pos]
    with peft_model.disable_adapter():
        mean, std = standardisation(model, data, fit_idx, settings.batch_size, fold_seed, settings.workers)
    head = make_head(model.dim, mean, std, fold_seed).to(model.device)
    total = settings.epochs * len(fit_idx)
    with progress_bar(f"{model.name} · lora · fold {k}", total=total, enabled=show_progress) as advance:
        report = train_fold(model, peft_model, head, data, cohort.y, fit_idx, val_idx, settings, fold_seed, advance)
    tmp = run_dir / f".fold-{k}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapters.save_adapter(peft_model, tmp / "adapter")
    # safetensors, not torch.save: a store travels between labs, and loading a pickle can run code
    save_file({n: t.detach().cpu().contiguous() for n, t in head.state_dict().items()}, str(tmp / HEAD_FILE),
              metadata={"dim": str(model.dim), "hidden": json.dumps(list(HIDDEN))})
    np.savez(tmp / "split.npz", fit=fit_idx, validation=val_idx, test=np.asarray(split.test_idx))
    provenance = {**base, "fold": k, "split": split.name, "fold_seed": fold_seed, "n_train": int(len(train)),
                  "n_fit": int(len(fit_idx)), "n_validation": int(len(val_idx)), "n_test": int(len(split.test_idx)),
                  "validation": how, "standardisation_cells": int(min(STATS_CELLS, len(fit_idx))),
                  "adapter_sha256": sha256_file(tmp / "adapter" / "adapter_model.safetensors"),
                  "training_report": report.as_dict(), "created_at": now().isoformat()}
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1, default=str))
    (tmp / "done").write_text("ok")
    shutil.rmtree(fold_dir, ignore_errors=True)
    os.replace(tmp, fold_dir)                                    # the fold appears whole, or not at all
    return head, report.as_dict()


def _load_fold(peft_model, model, fold_dir: Path):
    """A saved fold's adapter (into ``peft_model``) and head."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = fold_dir / HEAD_FILE
    if not path.is_file():
        raise UserError(f"{fold_dir} has no {HEAD_FILE} (folds saved by an older scdrugmap kept a pickled head.pt, "
                        f"which is no longer read): rerun with --force to retrain the run")
    adapters.load_adapter_state(peft_model, adapters.read_adapter(fold_dir / "adapter"))
    with safe_open(str(path), framework="pt") as f:
        dim = int((f.metadata() or {}).get("dim", -1))
    if dim != model.dim:
        raise UserError(f"{path} was trained on {dim}-d embeddings, this model gives {model.dim}-d: delete {fold_dir} "
                        "to retrain the fold")
    head = make_head(model.dim, np.zeros(model.dim), np.ones(model.dim), 0)
    head.load_state_dict(load_file(str(path)))
    return head.to(model.device).eval()


def _record(split, y, proba, seconds: float) -> dict:
    """A probe-style record (see :func:`scdrugmap.probe.evaluate.evaluate`)."""
    y_test = y[split.test_idx]
    record = {"split": split.name, "n_train": int(len(split.train_idx)), "n_test": int(len(split.test_idx)),
              "n_train_pos": int(y[split.train_idx].sum()), "n_test_pos": int(y_test.sum()), "status": "ok",
              "reason": "", "fit_seconds": float(seconds), "metrics": score(y_test, proba, positive=1)}
    if len(np.unique(y_test)) < 2:
        record["status"] = "one-class-test"
        record["reason"] = f"test part has only class {int(y_test[0])}; AUROC, AUPRC and MCC are undefined (NaN)"
    return record


def _validation_groups(cohort, cells, train: np.ndarray):
    """Whole units for the validation part: the pooled protocol's groups (none for a cell-level
    split); under the cross protocol the training part's datasets, else its patients, else its
    samples, whichever first gives each class at least 2 groups."""
    if cohort.groups is not None:
        return np.asarray(cohort.groups)[train]
    if cohort.group_by != "dataset":
        return None
    y = cohort.y[train]
    for column in ("dataset", "patient", "sample"):
        values = cells[column].to_numpy()[train]
        if pd.isna(values).any():
            continue
        values = values.astype(str)
        if min(len(np.unique(values[y == c])) for c in (0, 1)) >= 2:
            return values
    return None


# -- exported embeddings ----------------------------------------------------------------------------
def _export(store, model, sha, peft_model, run_id, run_dir, cells, cohort, sources, dtype, lora, settings, force,
            show_progress, echo) -> None:
    """Out-of-fold embeddings of every cell of the cohort's datasets, as ``<backbone>+lora:<run_id>``."""
    name = f"{model.name}+lora:{run_id}"
    done = set(store.provenance(name)["dataset"])
    todo = [d for d in cohort.datasets if force or d not in done]
    if not todo:
        echo(f"{name}: already exported")
        return
    k_total = len(cohort.splits)
    folds = [run_dir / f"fold-{k}" for k in range(1, k_total + 1)]
    missing = [f.name for f in folds if not (f / "done").is_file()]
    if missing:
        raise UserError(f"cannot export {name}: {', '.join(missing)} of {run_dir} are missing; rerun with --force")
    if peft_model is None:
        targets = lora["targets"]
        peft_model = adapters.attach(model, targets, lora["rank"], lora["alpha"], lora["dropout"], 0)
    states = [adapters.read_adapter(f / "adapter") for f in folds]
    shas = [sha256_file(f / "adapter" / "adapter_model.safetensors") for f in folds]
    # the fold whose test part holds each cohort cell; fold 1 for the datasets' other cells
    fold_of = np.zeros(len(cells), dtype=np.int64)
    for k, split in enumerate(cohort.splits):
        fold_of[split.test_idx] = k
    names, rows = cells["dataset"].to_numpy(), cells["row"].to_numpy()
    adapters.set_training(peft_model, False)
    for dataset in todo:
        source = sources[dataset]
        assignment = np.zeros(source.n_cells, dtype=np.int64)
        mine = names == dataset
        assignment[rows[mine]] = fold_of[mine]
        params = {**_jsonable(model.params()), **_jsonable(model.dataset_params(source)), "lora_run": run_id,
                  "method": METHOD, "lora": {k: lora[k] for k in ("rank", "alpha", "dropout", "targets")},
                  "adapter_sha256": shas, "artefacts": f"{FOLDER}/{run_id}",
                  "adapters": "out-of-fold: each cohort cell embedded by the adapter of the fold whose test part "
                              "held it; the dataset's cells outside the cohort by fold 1's adapter",
                  "cohort_cells": int(mine.sum())}
        job = {"params": params, "source_sha256": source.row["source_sha256"], "checkpoint_sha256": sha}
        staged = arrays.StagedArray(store.embeddings_path, name, dataset, source.n_cells, model.dim, dtype,
                                    arrays.DEFAULT_CHUNK_ROWS, job)
        done_chunks = staged.done_chunks()
        with progress_bar(f"{name} · {dataset}", total=source.n_cells, enabled=show_progress) as advance:
            for i in range(staged.n_chunks):
                lo, hi = staged.chunk_bounds(i)
                if i not in done_chunks:
                    staged.write_chunk(i, _embed_chunk(model, peft_model, states, source, lo, hi,
                                                       assignment[lo:hi], settings))
                advance(hi - lo)
        _commit(store, name, source, staged, model.dim, dtype, sha, params)
        echo(f"{name} · {dataset}: {source.n_cells:,} cells x {model.dim} ({dtype})")


class _BlockCells:
    """The items of one prepared block, with their lengths as an array (what :func:`embed` reads)."""

    def __init__(self, part):
        self.part = part
        self.lengths = np.asarray(part.lengths())

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.part[i]


def _embed_chunk(model, peft_model, states, source, lo, hi, assignment, settings) -> np.ndarray:
    cells = _BlockCells(model.finetune_cells(source, source.rows(lo, hi)))
    out = np.empty((hi - lo, model.dim), dtype=np.float32)
    for k in np.unique(assignment):
        adapters.load_adapter_state(peft_model, states[k])
        idx = np.flatnonzero(assignment == k)
        out[idx] = embed(model, cells, idx, settings.batch_size, settings.workers).cpu().numpy()
    return out


def _commit(store, name, source, staged, dim, dtype, checkpoint_sha256, params) -> None:
    """Move the finished array in place and point the index at it (as the extraction runner does)."""
    row = {"backbone": name, "dataset": source.name, "n_cells": source.n_cells, "dim": dim,
           "dtype": dtype, "chunk_rows": staged.chunk_rows, "scdrugmap_version": __version__,
           "checkpoint_sha256": checkpoint_sha256, "source_sha256": source.row["source_sha256"],
           "params": json.dumps(params, sort_keys=True, default=str), "created_at": now()}
    commit_staged(store, staged, row)


# -- helpers ----------------------------------------------------------------------------------------
def _check_args(protocol, group_by, rank, alpha, dropout, epochs, lr, batch_size, grad_accum, patience,
                val_fraction, dtype, n_splits) -> None:
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if group_by not in GROUP_BY_CHOICES:
        raise UserError(f"unknown --group-by {group_by!r}; choose one of: {', '.join(GROUP_BY_CHOICES)}")
    checks = [(rank >= 1, "--rank must be at least 1"), (alpha > 0, "--alpha must be positive"),
              (0 <= dropout < 1, "--dropout must be in [0, 1)"), (epochs >= 1, "--epochs must be at least 1"),
              (lr > 0, "--lr must be positive"), (batch_size is None or batch_size >= 1, "--batch-size must be at least 1"),
              (grad_accum >= 1, "--grad-accum must be at least 1"), (patience >= 1, "--patience must be at least 1"),
              (0 < val_fraction < 0.5, "--val-fraction must be in (0, 0.5)"),
              (dtype in arrays.DTYPES, f"--dtype must be one of {', '.join(arrays.DTYPES)}"),
              (n_splits >= 2, "the number of folds must be at least 2")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _run_key(model, sha, backbone, store, cohort, cells, where, protocol, group_by, seed, positive, n_splits, lora,
             settings, val_fraction) -> dict:
    """Everything that determines a run's result (its id is a hash of this)."""
    rows = store.datasets().set_index("dataset")
    backbone_params = {k: v for k, v in _jsonable(model.params()).items() if k != "workers"}
    training = {k: v for k, v in settings.as_dict().items() if k != "workers"}
    return {"backbone": backbone, "checkpoint_sha256": sha, "backbone_params": backbone_params,
            "cohort": {"where": where or "", "n_cells": int(len(cells)),
                       "datasets": {d: rows.loc[d, "source_sha256"] for d in cohort.datasets}},
            "protocol": protocol, "group_by": group_by, "seed": seed, "positive": positive, "n_splits": n_splits,
            "lora": {k: lora[k] for k in ("rank", "alpha", "dropout", "targets")}, "training": training,
            "val_fraction": val_fraction, "head": _head_facts(model.dim)}


def _stored_run(store, run_id: str) -> ProbeRun | None:
    with store.connect() as con:
        run = con.execute("SELECT * FROM probe_runs WHERE run_id = ?", [run_id]).df()
        if run.empty:
            return None
        results = con.execute("SELECT * FROM probe_results WHERE run_id = ? ORDER BY split", [run_id]).df()
    r = run.iloc[0]
    notes = [n for n in (r["note"] or "").split("; ") if n] if isinstance(r["note"], str) else []
    return ProbeRun(run_id, r["backbone"], r["head"], r["protocol"], r["group_by"], int(r["n_cells"]),
                    list(r["datasets"]), results[RESULT_COLUMNS].reset_index(drop=True), notes, method=r["method"],
                    params=json.loads(r["params"]))


def _head_facts(dim: int) -> dict:
    return {"architecture": f"standardise (frozen-embedding mean/std of up to {STATS_CELLS} training cells), "
                            f"Linear({dim}, {HIDDEN[0]}), ReLU, Linear({HIDDEN[0]}, {HIDDEN[1]}), ReLU, "
                            f"Linear({HIDDEN[1]}, 2)",
            "loss": "cross-entropy, balanced class weights", "optimiser": "AdamW (adapters + head)",
            "selection": "best epoch by balanced validation loss; early stopping"}


def _fold_seed(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:4], "little")


def _other(positive: str) -> str:
    return "sensitive" if positive == "resistant" else "resistant"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "unknown"


def _jsonable(value) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(json.dumps(value, default=str))
