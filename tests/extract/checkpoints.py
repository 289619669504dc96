"""Randomly initialised checkpoints in the official release layouts, and a small real dataset."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from conftest import PC9, SHARED, need_shared

GENEFORMER_ASSETS = SHARED / "backbone_assets" / "geneformer"


def save_geneformer(folder: Path, config_file: str = "config_6L.json", v2: bool = False, **overrides) -> Path:
    """A random BertForMaskedLM saved as the release does, next to the real (V1) dictionaries.

    ``v2=True`` adds ``<cls>``/``<eos>`` to the token dictionary (what marks a V2 release) and
    sizes the config's vocabulary to match.
    """
    import torch
    import transformers

    if not GENEFORMER_ASSETS.exists():
        pytest.skip("Geneformer assets not found at ../shared/backbone_assets/geneformer")
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
    need_shared(PC9)
    a = ad.read_h5ad(PC9)
    keep = np.r_[0:per_class, len(a) - per_class:len(a)]
    path.parent.mkdir(parents=True, exist_ok=True)
    a[keep].copy().write_h5ad(path)
    return path
