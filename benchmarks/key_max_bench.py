"""How far ``--option key_max=batch`` (the official batched Performer kernel) moves scBERT and
cellLM embeddings from the default ``key_max=cell`` (each cell as if alone in its batch).

The official softmax kernel subtracts one maximum over the whole key tensor of a batch before the
exponential, and adds ``eps = 1e-4`` after it, so in a batched official run a cell's features
depend on the other cells of its batch. This script measures that dependence with scdrugmap's
own code: the same cells embedded with ``key_max=cell`` and with ``key_max=batch`` at each
``--batch-sizes`` value (batches of consecutive cells, as an official ``DataLoader(shuffle=False)``
forms them), and per cell

* the relative change ``|e_batch - e_cell| / |e_cell|`` in % of the embedding's L2 norm, and
* the centred cosine ``cos(e_batch - mean_batch, e_cell - mean_cell)``, each set centred by its
  own mean over the measured cells (random weights make every cell's embedding share one large
  component; centring keeps what tells cells apart).

Checkpoints: random weights at the released shapes, built as ``extract_bench.py`` builds them
(cached in ``.bench/checkpoints``): cellLM from the release config ``cellLM_ctc.json`` (512-d, 10
layers, 16 heads, ``max_seq_len`` 6,000), scBERT at ``PerformerLM(num_tokens=7, dim=200,
depth=6, heads=10)`` over 16,906 genes. Cells: ``--cells`` real PC9 + erlotinib cells drawn at
random (seeded) from ``../shared/data/pc9_erlotinib.h5ad``, in the drawn order. CPU, fp32, the
engine's path (tokenise a block -> batches -> forward -> pool), no store.

The default run (cellLM: 8 cells; scBERT: 4 cells; batch 4) takes about 2 minutes on 2 cores.
The figures in ``docs/backbones.md``: ``--cells 32 --batch-sizes 4 32 --backbone celllm`` and
``--cells 8 --batch-sizes 4 8 --backbone scbert`` (scBERT at batch 32 needs more than 20 GB for
its feature maps).

Run: ``python benchmarks/key_max_bench.py [--backbone celllm|scbert ...] [--cells N]
[--batch-sizes 4 32] [--seed 0] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, machine

sys.path.insert(0, str(ROOT / "tests" / "extract"))

import checkpoints as ck  # noqa: E402
from extract_bench import _celllm, _scbert, checkpoint  # noqa: E402

from scdrugmap.extract import registry  # noqa: E402

BUILDERS = {"celllm": _celllm, "scbert": _scbert}
DEFAULT_CELLS = {"celllm": 8, "scbert": 4}


def compare(batch: np.ndarray, cell: np.ndarray) -> dict:
    """Per-cell relative change (% of the key_max=cell norm) and centred cosine."""
    rel = 100 * np.linalg.norm(batch - cell, axis=1) / np.linalg.norm(cell, axis=1)
    b, c = batch - batch.mean(0), cell - cell.mean(0)
    cos = (b * c).sum(1) / (np.linalg.norm(b, axis=1) * np.linalg.norm(c, axis=1))
    return {"rel_change_pct": {"min": float(rel.min()), "median": float(np.median(rel)), "max": float(rel.max())},
            "centred_cosine": {"min": float(cos.min()), "median": float(np.median(cos)), "max": float(cos.max())},
            "max_abs_change": float(np.abs(batch - cell).max()), "max_abs_value": float(np.abs(cell).max())}


def measure(name: str, n_cells: int, batch_sizes: list, seed: int) -> list:
    import scipy.sparse as sp

    folder = checkpoint(name, BUILDERS[name])
    source = ck.H5adSource(ck.PC9)
    rows = np.random.default_rng(seed).choice(source.adata.n_obs, size=n_cells, replace=False)
    block = sp.csr_matrix(source.adata.X)[rows]
    cls = registry.get(name)
    t0 = time.perf_counter()
    model = cls(model_dir=folder, batch_size=max(batch_sizes))
    tok = model.cell_tokenizer(source)
    lengths = tok.lengths(tok.prepare(block))
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    cell = model.embed_block(block, tok)                     # key_max=cell: batching does not matter
    seconds = {"cell": time.perf_counter() - t0}
    out = []
    for b in batch_sizes:
        batched = cls(model_dir=folder, batch_size=b, options={"key_max": "batch"})
        t0 = time.perf_counter()
        emb = batched.embed_block(block, batched.cell_tokenizer(source))
        seconds[f"batch{b}"] = time.perf_counter() - t0
        row = {"backbone": name, "cells": n_cells, "batch_size": b, "batches": -(-n_cells // b),
               "median_tokens": int(np.median(lengths)), **compare(emb, cell)}
        out.append(row)
    for row in out:
        row["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        row["load_seconds"] = round(load, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", dest="backbones", choices=list(BUILDERS))
    ap.add_argument("--cells", type=int, default=None, help="cells per backbone (default: cellLM 8, scBERT 4)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    import torch

    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.backbones or ["celllm", "scbert"]:
        n = args.cells or DEFAULT_CELLS[name]
        rows += measure(name, n, sorted(set(args.batch_sizes)), args.seed)
    print("| backbone | cells | batch | median tokens | change, % of norm (min / median / max) | "
          "centred cosine (min / median) | largest coordinate change (largest coordinate) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel, cos = r["rel_change_pct"], r["centred_cosine"]
        print(f"| `{r['backbone']}` | {r['cells']} | {r['batch_size']} | {r['median_tokens']:,} | "
              f"{rel['min']:.2f} / {rel['median']:.2f} / {rel['max']:.2f} | {cos['min']:.4f} / {cos['median']:.4f} | "
              f"{r['max_abs_change']:.4f} ({r['max_abs_value']:.2f}) | "
              f"{', '.join(f'{k} {v}' for k, v in r['seconds'].items())} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
