"""Random UCE model files in the official ``model_files/`` layout (test support).

Written from the official code (github.com/snap-stanford/UCE @ 8ead6e0), not from scdrugmap's
module, so a wrong name or shape there fails the strict load:

* the checkpoint is a bare state dict (``evaluate.run_eval``: ``load_state_dict(torch.load(...),
  strict=True)``) of ``model.py::TransformerModel``: ``pos_encoder.pe`` (the ``PositionalEncoding``
  buffer, max_len 1,536), ``encoder`` (Linear, GELU, LayerNorm), ``transformer_encoder.layers.{i}``
  (``nn.TransformerEncoderLayer``: fused ``self_attn.in_proj_*``, ``out_proj``, ``linear1``,
  ``linear2``, ``norm1``, ``norm2``), ``decoder`` (three ``full_block`` = Linear, LayerNorm, GELU,
  Dropout, then a Linear), ``binary_decoder`` (``full_block(output_dim + 1280, 2048)``, (2048, 512),
  (512, 128), Linear(128, 1); the 1280 is a literal in ``model.py``, not d_model, so the first
  block takes output_dim + 1280 inputs at every width), ``gene_embedding_layer`` (Linear, GELU,
  LayerNorm) and ``pe_embedding.weight`` (145,469 rows: ``run_eval`` builds it before the load);
* ``all_tokens.torch``: a bare (143,574 x token_dim) tensor: row 0 (pad) zeros, rows 1-3
  (chromosome left/right, CLS) normal, then every species' gene embeddings in sorted species
  order (``data_proc/generate_reduced_chrom_files.py``); the checkpoint's table is this plus the
  1,895 chromosome rows that ``evaluate.get_ESM2_embeddings`` draws after ``torch.manual_seed(23)``;
* ``species_offsets.pkl``: species -> first row of its genes (4 + the gene counts of the species
  before it); ``species_chrom.csv``: ``gene_symbol, chromosome, start, species`` (the notebook
  ``Create New Species Files``), with non-numeric chromosomes and rows of another species;
* ``protein_embeddings/Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt``: a ``torch.save``
  dict symbol -> embedding, some keys lower-case (the official loader upper-cases them).

Sizes are small (token_dim 16, d_model 80 = 20 heads of 4, 2 layers); the row counts of the token
tables are the real ones. Needs neither pytest nor conftest.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np

SMALL = {"token_dim": 16, "d_model": 80, "d_hid": 160, "output_dim": 48, "nlayers": 2}
N_TOKENS = 143574            # rows of the released all_tokens.torch
N_CHROM_TENSORS = 1895       # evaluate.get_ESM2_embeddings
MAX_LEN = 1536               # model.py::PositionalEncoding
BINARY_EXTRA = 1280          # model.py::TransformerModel: full_block(output_dim + 1280, 2048), a literal
SPECIES = ("frog", "human", "macaca_fascicularis", "macaca_mulatta", "mouse", "mouse_lemur", "pig", "zebrafish")
HUMAN_PE = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"
HUMAN_CHROMS = ("1", "2", "3", "10", "17", "X", "Y", "MT", "KI270728.1")
MOUSE_CHROMS = ("1", "4", "X", "MT")


def official_keys(token_dim: int, d_model: int, d_hid: int, output_dim: int, nlayers: int) -> "OrderedDict":
    """The state-dict names and shapes of ``TransformerModel`` (+ ``pe_embedding``), in its order."""
    keys = OrderedDict()
    keys["pos_encoder.pe"] = (MAX_LEN, 1, d_model)
    keys["encoder.0.weight"], keys["encoder.0.bias"] = (d_model, token_dim), (d_model,)
    keys["encoder.2.weight"], keys["encoder.2.bias"] = (d_model,), (d_model,)
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}."
        keys[p + "self_attn.in_proj_weight"] = (3 * d_model, d_model)
        keys[p + "self_attn.in_proj_bias"] = (3 * d_model,)
        keys[p + "self_attn.out_proj.weight"] = (d_model, d_model)
        keys[p + "self_attn.out_proj.bias"] = (d_model,)
        keys[p + "linear1.weight"], keys[p + "linear1.bias"] = (d_hid, d_model), (d_hid,)
        keys[p + "linear2.weight"], keys[p + "linear2.bias"] = (d_model, d_hid), (d_model,)
        keys[p + "norm1.weight"], keys[p + "norm1.bias"] = (d_model,), (d_model,)
        keys[p + "norm2.weight"], keys[p + "norm2.bias"] = (d_model,), (d_model,)
    blocks = {"decoder": [(d_model, 1024), (1024, output_dim), (output_dim, output_dim)],
              "binary_decoder": [(output_dim + BINARY_EXTRA, 2048), (2048, 512), (512, 128)]}
    for name, sizes in blocks.items():
        for j, (n_in, n_out) in enumerate(sizes):
            keys[f"{name}.{j}.0.weight"], keys[f"{name}.{j}.0.bias"] = (n_out, n_in), (n_out,)
            keys[f"{name}.{j}.1.weight"], keys[f"{name}.{j}.1.bias"] = (n_out,), (n_out,)
        last = (output_dim, output_dim) if name == "decoder" else (1, 128)
        keys[f"{name}.3.weight"], keys[f"{name}.3.bias"] = last, (last[0],)
    keys["gene_embedding_layer.0.weight"] = (d_model, token_dim)
    keys["gene_embedding_layer.0.bias"] = (d_model,)
    keys["gene_embedding_layer.2.weight"] = (d_model,)
    keys["gene_embedding_layer.2.bias"] = (d_model,)
    keys["pe_embedding.weight"] = (N_TOKENS + N_CHROM_TENSORS, token_dim)
    return keys


def sinusoid(max_len: int, d_model: int):
    """``PositionalEncoding.pe``: sin on even, cos on odd columns, (max_len, 1, d_model)."""
    import torch

    position = torch.arange(max_len).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, 1, d_model)
    pe[:, 0, 0::2] = torch.sin(position * div)
    pe[:, 0, 1::2] = torch.cos(position * div)
    return pe


def random_state(keys: dict, table, seed: int = 0) -> "OrderedDict":
    """Linear weights ~ 1/sqrt(fan in), norm scales near 1, small biases; the token table given."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in keys.items():
        if name == "pos_encoder.pe":
            state[name] = sinusoid(shape[0], shape[2])
        elif name == "pe_embedding.weight":
            state[name] = table
        elif name.endswith("weight") and len(shape) == 2:
            state[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith("weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


def gene_layout(symbols, seed: int = 0):
    """(human dict symbols in dict order, csv rows): a few dict genes lack a position, a few csv-only."""
    rng = np.random.default_rng(seed)
    genes = list(dict.fromkeys(str(s).upper() for s in symbols)) + [f"FAKEGENE{i}" for i in range(20)]
    order = rng.permutation(len(genes))
    in_dict = [genes[i] for i in order]
    positioned = in_dict[5:] + [f"CSVONLY{i}" for i in range(5)]          # the first 5 have no csv row
    n = len(positioned) + 50
    starts = 1 + rng.permutation(n) * 1000 + rng.integers(0, 1000, n)                  # distinct
    human = rng.choice(len(HUMAN_CHROMS), len(positioned))
    mouse = rng.choice(len(MOUSE_CHROMS), 50)
    rows = [(g, HUMAN_CHROMS[human[i]], int(starts[i]), "human") for i, g in enumerate(positioned)]
    rows += [(f"Mm{i}", MOUSE_CHROMS[mouse[i]], int(starts[len(positioned) + i]), "mouse") for i in range(50)]
    return in_dict, rows


def write_model_files(folder: Path, symbols, checkpoint: str = "4layer_model.torch", all_tokens: bool = True,
                      seed: int = 0, lower_keys: int = 30, **sizes) -> Path:
    """``folder`` as UCE's ``model_files/``: the checkpoint, all_tokens.torch, species_chrom.csv,
    species_offsets.pkl and the human protein-embedding dict covering ``symbols``."""
    import pandas as pd
    import torch

    dims = {**SMALL, **sizes}
    t = dims["token_dim"]
    folder = Path(folder)
    (folder / "protein_embeddings").mkdir(parents=True, exist_ok=True)
    in_dict, csv_rows = gene_layout(symbols, seed)
    g = torch.Generator().manual_seed(seed + 1)
    counts = {"frog": 20000, "human": len(in_dict)}
    rest = [s for s in SPECIES if s not in counts]
    left = N_TOKENS - 4 - sum(counts.values())
    counts.update({s: left // len(rest) + (i < left % len(rest)) for i, s in enumerate(rest)})
    offsets, row = {}, 4
    for s in SPECIES:
        offsets[s] = row
        row += counts[s]
    tokens = torch.randn((N_TOKENS, t), generator=g)
    tokens[0] = 0                                                              # pad
    human = tokens[offsets["human"]:offsets["human"] + len(in_dict)]
    embeddings = {(sym.lower() if i < lower_keys else sym): human[i].clone() for i, sym in enumerate(in_dict)}
    torch.save(embeddings, folder / "protein_embeddings" / HUMAN_PE)
    if all_tokens:
        torch.save(tokens, folder / "all_tokens.torch")
    chrom_rows = torch.normal(mean=0, std=1, size=(N_CHROM_TENSORS, t), generator=torch.Generator().manual_seed(23))
    table = torch.vstack([tokens, chrom_rows])
    torch.save(random_state(official_keys(**dims), table, seed), folder / checkpoint)
    with open(folder / "species_offsets.pkl", "wb") as f:
        pickle.dump(offsets, f)
    pd.DataFrame(csv_rows, columns=["gene_symbol", "chromosome", "start", "species"]).to_csv(
        folder / "species_chrom.csv", index=False)
    return folder
