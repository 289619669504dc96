"""LoRA fine-tuning benchmark: training and scoring cells/s and peak memory per backbone.

Data: real PC9 cells (``../shared/data``), drawn at random (seeded) as in ``extract_bench.py``,
ingested into a cached store with their response labels.

Checkpoints (random weights, official file layouts; built as the tests build them):

* ``--shape small`` (the default on a CPU): the tests' sizes (tests/finetune/test_adapters.py),
  a few layers of 32-64 dims, so the figures show the pipeline's overheads, not model compute;
* ``--shape release`` (the default on CUDA): the released shapes of extract_bench.py
  (Geneformer 6L/12L, tGPT 1024-d, the real MiniLM weights, scGPT whole-human, scFoundation
  0.1B, CellPLM 85M, UCE 4-layer, scBERT, cellLM).

Each backbone runs in its own child process (so its peak RSS is its own) through the code
``scdrugmap finetune`` runs: the cells prepared by the backbone (``finetune_cells``; UCE with
``min_cells=0``, since its gene filter would drop most genes of a few dozen cells), LoRA
(peft) on its default attention targets (``--target-modules`` to change), the gradient check,
then one training epoch over ``--cells`` cells (:func:`scdrugmap.finetune.train.train_fold`:
length-aware shuffled batches, autocast, AdamW on adapters + head) and one scoring pass
(:func:`~scdrugmap.finetune.train.predict`). Printed per backbone: adapter and backbone
parameters, median tokens per cell, training cells/s (forward + backward + step, after a
warm-up batch), scoring cells/s, gradient-check seconds, and peak memory: the child's peak RSS
and its growth during training on a CPU; ``torch.cuda.max_memory_allocated`` during training on
CUDA.

Run: ``python benchmarks/finetune_bench.py [--device cuda] [--shape small|release] [--cells N]
[--batch-size N] [--backbone NAME ...] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import CACHE, ROOT, machine

sys.path.insert(0, str(ROOT / "tests" / "extract"))

import checkpoints as ck  # noqa: E402

SMALL_GENEFORMER = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        max_position_embeddings=64)


def _pc9_genes(n: int) -> list:
    import anndata as ad

    return list(ad.read_h5ad(ck.PC9, backed="r").var_names.astype(str)[:n])


def _small_scgpt(folder):
    from official_scgpt import save_official_scgpt

    return save_official_scgpt(folder, embsize=32, nlayers=2, nheads=2, d_hid=48)


def _small_scfoundation(folder):
    from official_scfoundation import save_scfoundation

    return save_scfoundation(folder, hidden=32, depth=2, heads=2)


def _small_cellplm(folder):
    from official_cellplm import save_cellplm

    save_cellplm(folder, enc_hid=32, enc_layers=2, post_latent_dim=16, dec_hid=16)
    shutil.copy(ck.GENEFORMER_ASSETS / "gene_name_id_dict.pkl", folder / "gene_name_id_dict.pkl")
    return folder


def _small_uce(folder):
    from official_uce import write_model_files

    return write_model_files(folder, _pc9_genes(25077), d_model=40, d_hid=80, output_dim=24)


def _small_scbert(folder):
    from official_performer import save_scbert

    return save_scbert(folder, _pc9_genes(16906))


def _small_celllm(folder):
    from official_performer import save_celllm

    return save_celllm(folder, _pc9_genes(19379))


# name -> (registry name, builder, options); small shapes
SMALL = {
    "geneformer": ("geneformer", lambda d: ck.save_geneformer(d, **SMALL_GENEFORMER), {}),
    "tgpt": ("tgpt", lambda d: ck.save_tgpt(d, n_embd=32, n_layer=2, n_head=2), {}),
    "llm": ("llm", ck.save_llama, {"top_k": 100}),
    "scgpt": ("scgpt", _small_scgpt, {}),
    "scfoundation": ("scfoundation", _small_scfoundation, {}),
    "cellplm": ("cellplm", _small_cellplm, {}),
    "uce": ("uce", _small_uce, {}),
    "scbert": ("scbert", _small_scbert, {}),
    "celllm": ("celllm", _small_celllm, {}),
}


def release_backbones() -> dict:
    from extract_bench import BACKBONES

    return {name: (reg, builder, options) for name, (reg, builder, options, *_rest) in BACKBONES.items()
            if reg not in ("hvg", "pca")}


def build(name: str, builder, shape: str) -> Path:
    """A cached checkpoint (built in a child process, so its memory never counts)."""
    if shape == "release":
        from extract_bench import checkpoint

        return checkpoint(name)
    from extract_bench import build_once

    return build_once(CACHE / "finetune" / "checkpoints" / name, builder, f"a small random {name} checkpoint")


def store_of(n_cells: int):
    """The extraction benchmark's store of ``n_cells`` random PC9 cells (built once, shared)."""
    from extract_bench import dataset

    return dataset(n_cells)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(name, reg_name, model_dir, options, store_dir, device, batch_size, rank, targets, queue):
    """In a child process: load, attach, check, train one epoch, score; put a result row on ``queue``."""
    try:
        queue.put(_measure(name, reg_name, model_dir, options, store_dir, device, batch_size, rank, targets))
    except BaseException as e:                                       # report, do not hang the parent
        queue.put({"backbone": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})


def _measure(name, reg_name, model_dir, options, store_dir, device, batch_size, rank, targets) -> dict:
    import torch

    from scdrugmap.extract import registry
    from scdrugmap.extract.runner import _sources
    from scdrugmap.finetune import adapters
    from scdrugmap.finetune.data import CohortCells, evaluation_batches, loader
    from scdrugmap.finetune.train import TrainSettings, make_head, predict, train_fold
    from scdrugmap.store.store import Store

    cuda = device.startswith("cuda")
    store = Store.open(store_dir)
    cells = store.cells()
    y = (cells["label"].to_numpy() == "resistant").astype(np.int64)
    (source,) = _sources(store, ["pc9"])
    cls = registry.get(reg_name)
    if reg_name == "uce":
        # the official gene filter (genes in >= 10 cells of the dataset) would drop most genes of a
        # few dozen cells; it does not change the cost per cell
        options = {**options, "min_cells": 0}
    batch = batch_size or cls.finetune_batch_size or cls.default_batch_size
    t0 = time.perf_counter()
    model = cls(model_dir=model_dir, device=device, batch_size=batch, options=options)
    data = CohortCells(model, {"pc9": source}, cells)
    load_s = time.perf_counter() - t0
    chosen, _ = adapters.resolve_targets(model, targets)
    peft_model = adapters.attach(model, chosen, rank=rank, alpha=rank, dropout=0.05, seed=0)
    idx = np.arange(len(cells))
    first = loader(data, evaluation_batches(idx[:4], data.lengths, 4), model.finetune_collate())
    t0 = time.perf_counter()
    adapters.check_gradients(model, peft_model, next(iter(first)), chosen)
    check_s = time.perf_counter() - t0
    head = make_head(model.dim, np.zeros(model.dim), np.ones(model.dim), 0).to(model.device)
    settings = TrainSettings(epochs=1, batch_size=batch, patience=1)
    # warm-up: one batch (allocator, kernels), not timed
    warm = idx[np.argsort(-data.lengths)[:batch]]
    train_fold(model, peft_model, head, data, y, warm, np.array([], dtype=np.int64), settings, 0)
    rss_before = peak_rss_gib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    report = train_fold(model, peft_model, head, data, y, idx, np.array([], dtype=np.int64), settings, 1)
    if cuda:
        torch.cuda.synchronize()
    row = {"backbone": name, "device": device, "cells": len(idx), "dim": model.dim, "batch": batch,
           "tokens_median": int(np.median(data.lengths)), **adapters.adapter_summary(peft_model),
           "lora_modules": len(chosen), "load_s": round(load_s, 1), "check_s": round(check_s, 2),
           "train_cells_per_s": round(report.samples_per_s, 2)}
    if cuda:
        row["train_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        row["peak_rss_gib"] = round(peak_rss_gib(), 2)
        row["train_rss_growth_gib"] = round(peak_rss_gib() - rss_before, 2)
    t0 = time.perf_counter()
    predict(model, head, data, idx, batch)
    if cuda:
        torch.cuda.synchronize()
    row["score_cells_per_s"] = round(len(idx) / (time.perf_counter() - t0), 2)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["small", "release"], help="default: small on CPU, release on CUDA")
    ap.add_argument("--cells", type=int, default=None, help="cells trained and scored (default 64 on CPU, 1,024 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: each backbone's")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target-modules", action="append", default=None, help="default: attention")
    ap.add_argument("--backbone", action="append", dest="backbones")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    import torch

    cuda = args.device.startswith("cuda")
    shape = args.shape or ("release" if cuda else "small")
    n_cells = args.cells or (1024 if cuda else 64)
    table = SMALL if shape == "small" else release_backbones()
    names = args.backbones or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown backbone(s) {unknown} for --shape {shape}: choose from {list(table)}")
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads")
          + f"; shape {shape}; {n_cells} cells")
    store = store_of(n_cells)
    rows = []
    for name in names:
        reg_name, builder, options = table[name]
        print(f"{name} ...", flush=True)
        model_dir = ck.minilm_dir() if (reg_name == "llm" and builder is None) else build(name, builder, shape)
        queue = multiprocessing.get_context("spawn").Queue()
        child = multiprocessing.get_context("spawn").Process(
            target=measure, args=(name, reg_name, model_dir, dict(options), store.path, args.device, args.batch_size,
                                  args.rank, args.target_modules or ["attention"], queue))
        child.start()
        row = queue.get()
        child.join()
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
    print()
    print(pd.DataFrame(rows).to_string(index=False))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
