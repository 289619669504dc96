"""``cellplm``: CellPLM (Wen et al., ICLR 2024), the cell embedding of the released checkpoints.

A compact re-implementation of the part of the official ``OmicsFormer`` (github.com/OmicsML/CellPLM,
``CellPLM/model/cellformer.py``) that produces a cell embedding, with the official state-dict key
names, so the released ``<name>.best.ckpt`` loads unchanged. Each step and its official source:

* **files** (``pipeline/__init__.py::load_pretrain``): ``<name>.config.json`` (sizes, gene list)
  and ``<name>.best.ckpt``, a ``torch.save`` dict whose ``model_state_dict`` holds the weights.
  ``--model-dir`` must hold one such pair, or ``--option name=<name>`` picks one. The official
  loader copies whatever key of the right name and shape it finds and silently keeps random
  values for the rest; here loading is strict: every weight the embedding uses, every weight of
  the modules the official model builds but does not run for an embedding (``embedder.norm0``,
  the positional-encoding table ``embedder.pe_enc``, the GMVAE's ``var``/``y_mu``/``y_var``) and
  nothing else must be there with the config's shapes. The NB decoder of the training model
  (``decoder.*``, ``decoder/zinb.py::NBMLPDecoder``) is accepted whole or not at all; it is checked
  against a declared list of names and shapes and never allocated or run. The configurations
  refused are those whose embedding would need modules not written here (``enc_mod`` other than
  ``flowformer``, ``latent_mod`` other than ``gmvae``, ``dsbn``, ``dar``, ``input_covariate``,
  ``cat_pe``).
* **genes** (``pipeline/__init__.py::Pipeline.common_preprocess``): source genes are matched to
  the config's ``gene_list`` (Ensembl IDs, 19,374 in ``20230926_85M``), genes outside it are
  dropped, the rest keep the source order. A dataset with Ensembl IDs (``ensembl_ids()``, version
  suffixes removed) is matched directly; a source column whose ID repeats adds its own term.
  **Difference:** the official code has no result there: it selects the genes by a list of names
  (``adata[:, [g for g in var_names if g in gene_set]]``), which fails on repeated var names
  (pandas ``InvalidIndexError``); IDs that appear once, the official case, are unaffected. A
  dataset with symbols only is mapped offline (the official pipeline asks the mygene web service,
  ``pipeline/experimental.py::symbol_to_ensembl``): ``--option gene_map=FILE``, a two-column
  TSV/CSV symbol -> Ensembl ID or a pickled dict such as Geneformer's ``gene_name_id_dict.pkl``,
  or such a file (``gene_name_id_dict*.pkl``, ``gene_map*.tsv``, ``gene_map*.csv``) in
  ``--model-dir``. Symbols are looked up as written, then case-insensitively. When several symbols
  map to one ID only the first column is kept, as the official ``var_names_make_unique`` after the
  conversion does. Fewer than 5% of the dataset's genes matched is refused.
* **input** (``embedder/omics.py::OmicsEmbedder.forward``, ``utils/data.py``): raw counts, no
  library-size normalisation; ``log1p`` of the counts, then a sparse product with the rows of the
  gene embedding ``embedder.feat_enc.emb`` of the matched genes: a cell's input is
  sum_g log1p(count_g) * emb[g].
* **embedder** (``embedder/omics.py::OmicsEmbeddingLayer.forward``): ``extra_linear`` = Linear,
  ReLU, Dropout, norm (the config's ``norm``: GroupNorm with 4 groups in the release). The
  positional encoding is a no-op for non-spatial data (the official code adds ``pe = 0.``), so
  its keys are loaded and unused; ``norm0`` is created but commented out of ``forward``.
* **encoder** (``encoder/transformer.py``, ``layer/flowformer.py::FlowformerLayer``,
  ``Flow_Attention``): ``enc_layers`` pre-norm layers, ``x + attn(LN1(x))`` then
  ``x + FF(LN2(x))`` with FF = Linear(d, 2d), GELU, Linear(2d, d); LayerNorm whatever the config's
  ``norm`` (the encoder does not receive it); ``enc_head`` heads (8 when absent). The attention
  is **flow attention across the cells of a batch**: one forward pass is one "sequence" whose
  tokens are cells, so a cell's embedding depends on the other cells of its batch (below).
* **latent** (``latent/__init__.py::PreLatentNorm``, ``latent/autoencoders.py::GMVAELatentLayer``,
  ``InferenceNet``): LayerNorm ``pre_latent_norm``, then the GMVAE inference network. The
  embedding is its mean ``mu`` (``post_latent_dim``, 512 in the release), as the official
  ``CellEmbeddingPipeline`` returns (``head/downstream.py::EmbedderHead``), not L2-normalised.
  **Difference from official runs:** the official GMVAE draws the cluster ``y`` with Gumbel noise
  even in ``eval()`` (``GumbelSoftmax.gumbel_softmax``, ``hard=True``), so its embeddings change
  from run to run; here ``y`` is the one-hot argmax of the cluster logits, deterministic. Where
  the logits of a cell have a clear winner both agree; elsewhere an official run gives one of the
  other clusters' ``mu`` at random. Nothing here is random.
* **batching**: which cells share a forward pass is part of the embedding, since they attend to
  each other. The official inference (``pipeline/cell_embedding.py::CellEmbeddingPipeline``,
  ``predict`` -> ``_inference``) reads ``inference_config['batch_size']`` (absent or 0: the
  number of cells, i.e. everything at once) and iterates over ``utils/data.py::
  TranscriptomicDataset``. That dataset has one item per value of ``obs['batch']``: the values are
  numbered by sklearn's ``LabelEncoder`` (sorted order) and an item holds the cells of one value in
  the dataset's order (a boolean mask), with their positions (``order_required``); without the
  column it warns and makes one item of all cells. ``_inference`` cuts each item into consecutive
  slices of ``batch_size`` cells from its first cell, the last slice taking what is left, runs one
  forward pass per slice and puts the predictions back in the dataset's order. scdrugmap follows
  this by default (``--option grouping=official``): the groups are those slices, computed once
  for the whole dataset in store order (:func:`official_groups`), per value of the obs column
  ``--option batch_col`` (default ``batch``, as the official code; the source file's obs, as
  written; missing values count as one value; ``batch_col=`` ignores any column; a column named
  explicitly must exist). The values' order changes no embedding. The store is written in chunks
  (``--chunk-rows``, 4,096 rows), several processes sharing them under torchrun, so a group may
  span chunks: the runner asks :meth:`CellPLM.embed_rows` for a chunk's rows, and each comes from
  a forward pass over its whole group, the group's other rows read from the source
  (:class:`DatasetEncoder`; a group that reaches into the next chunk is kept until that chunk is
  done, and a process whose share starts inside a group computes that group too). The
  embeddings therefore do not depend on the chunk size or the number of processes (tested);
  with the default 4,096 cells and chunks of 4,096 rows, and no batch column, a group is a chunk.
  ``batch_cells`` defaults to 4,096 rather than the official "all at once" (the pretraining used
  batches of up to 4,000 cells, ``max_batch_size``); ``--batch-size N`` means the same. Flow
  attention is linear in the number of cells, and so is memory: a 4,096-cell batch of PC9 cells
  (about 1,250 matched genes detected per cell) took about 0.35 GB beside the weights (55M used
  of the 85M) with the release's sizes on CPU. ``--option grouping=chunk`` keeps the earlier
  scheme: each store chunk is cut into ceil(rows / ``batch_cells``) groups of near-equal size
  (:func:`cell_groups`), never across chunks, so the chunk size changes the embeddings, and no
  batch column is used. A block handed to the encoder directly (benchmarks, tests) is taken as a
  dataset of its own without a batch column. Provenance records ``grouping``, ``batch_cells``,
  ``batch_col`` and, per dataset, ``batch_col_used``, ``batch_values`` and ``groups``; other
  groups give other embeddings (tested).
* **precision**: the engine's autocast (``--option precision``, bf16 on CUDA by default; the
  official code runs fp32). The sparse input product and the flow-attention normalisation
  (sums, reciprocals and softmax over up to thousands of cells) always run in fp32.

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import TorchBackbone, key_mismatches, sha256_files
from ..registry import Option, register

MIN_MATCHED = 0.05        # refuse a dataset when fewer than 5% of its genes are in the gene list
DEFAULT_BATCH_CELLS = 4096
GROUPINGS = ("official", "chunk")
BATCH_COL = "batch"       # the official TranscriptomicDataset groups by obs['batch']
PE_POSITIONS = 100 * 100  # utils/pe.py: a 100 x 100 grid of positions
QZYX_HIDDEN = 512         # latent/autoencoders.py::InferenceNet: nn.Linear(x_dim + y_dim, 512)
NB_HIDDEN = 128           # decoder/zinb.py::NB: n_dec_1=128
FLOW_EPS = 1e-6           # layer/flowformer.py::Flow_Attention eps
GENE_MAP_PATTERNS = ("gene_name_id_dict*.pkl", "gene_map*.tsv", "gene_map*.csv")
LATENT = "GMVAE mean, argmax cluster"
BATCHING = {
    "official": "the official CellEmbeddingPipeline's: within each batch_col value (when the dataset has the "
                "column) the cells in store order, cut into consecutive runs of batch_cells from the first, the "
                "last run the remainder, whatever the store chunks; the cells of a group attend to each other",
    "chunk": "consecutive store rows; each store chunk cut into ceil(rows / batch_cells) groups of near-equal size; "
             "the cells of a group attend to each other",
}


# ---- config and checkpoint files -----------------------------------------------------------
@dataclass(frozen=True)
class CellPLMConfig:
    """What the embedding and the key list need from ``<name>.config.json`` (official defaults
    for the keys the release omits: ``enc_head`` 8, ``pe_type`` 'sin', ``platform_num`` 0)."""

    genes: tuple
    hid: int
    layers: int
    heads: int
    latent: int
    clusters: int
    norm: str
    pe: bool
    dec_hid: int
    dec_layers: int
    out_dim: int
    covariates: tuple      # ((name, count), ...) of the decoder, official order batch, dataset, platform

    @classmethod
    def read(cls, path: Path) -> "CellPLMConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the CellPLM config {path}: {type(e).__name__}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} is not a CellPLM config (a JSON object is expected)")
        need = ("gene_list", "enc_hid", "enc_layers", "post_latent_dim", "dec_hid", "dec_layers", "out_dim")
        missing = [k for k in need if k not in raw]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: is it a CellPLM <name>.config.json?")
        refused = {"enc_mod": raw.get("enc_mod") != "flowformer", "latent_mod": raw.get("latent_mod") != "gmvae",
                   "dec_mod": raw.get("dec_mod", "nbmlp") != "nbmlp", "dsbn": bool(raw.get("dsbn")),
                   "dar": bool(raw.get("dar")), "input_covariate": bool(raw.get("input_covariate")),
                   "cat_pe": bool(raw.get("cat_pe", True)) and raw.get("pe_type", "sin") is not None,
                   "norm": raw.get("norm", "layernorm") not in ("groupnorm", "layernorm"),
                   "pe_type": raw.get("pe_type", "sin") not in (None, "sin", "sinu", "sinusoidal", "learnable",
                                                               "bin")}
        bad = [f"{k}={raw.get(k)!r}" for k, v in refused.items() if v]
        if bad:
            raise UserError(f"{path}: {', '.join(bad)} is not supported (the release has enc_mod 'flowformer', "
                            "latent_mod 'gmvae', dec_mod 'nbmlp', norm 'groupnorm', cat_pe false)")
        try:
            cfg = cls(genes=tuple(str(g) for g in raw["gene_list"]), hid=int(raw["enc_hid"]),
                      layers=int(raw["enc_layers"]), heads=int(raw.get("enc_head", 8)),
                      latent=int(raw["post_latent_dim"]), clusters=int(raw.get("num_clusters", 16)),
                      norm=raw.get("norm", "layernorm"), pe=raw.get("pe_type", "sin") is not None,
                      dec_hid=int(raw["dec_hid"]), dec_layers=int(raw["dec_layers"]), out_dim=int(raw["out_dim"]),
                      covariates=tuple((k, int(raw.get(f"{k}_num", 0))) for k in ("batch", "dataset", "platform")))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: a size is not a number ({e})") from None
        if not cfg.genes or cfg.hid % cfg.heads or min(cfg.hid, cfg.layers, cfg.latent, cfg.clusters) < 1:
            raise UserError(f"{path}: empty gene list, or enc_hid {cfg.hid} not divisible into {cfg.heads} heads")
        return cfg


def find_checkpoint(folder: Path, name: str = "") -> tuple[Path, Path]:
    """``(<name>.config.json, <name>.best.ckpt)`` in ``folder``: the named pair, or the only one."""
    if not folder.is_dir():
        raise UserError(f"--model-dir {folder} is not a directory: point it at the folder holding CellPLM's "
                        "<name>.best.ckpt and <name>.config.json")
    if name:
        config, ckpt = folder / f"{name}.config.json", folder / f"{name}.best.ckpt"
        absent = [p.name for p in (config, ckpt) if not p.is_file()]
        if absent:
            raise UserError(f"{folder} has no {' or '.join(absent)}: check --option name={name}")
        return config, ckpt
    configs = {p.name[: -len(".config.json")] for p in folder.glob("*.config.json")}
    ckpts = {p.name[: -len(".best.ckpt")] for p in folder.glob("*.best.ckpt")}
    pairs = sorted(configs & ckpts)
    if len(pairs) > 1:
        raise UserError(f"{folder} holds several CellPLM checkpoints ({', '.join(pairs)}): "
                        "choose one with --option name=NAME")
    if not pairs:
        lone = sorted(configs ^ ckpts)
        if lone:
            have = f"{lone[0]}.config.json" if lone[0] in configs else f"{lone[0]}.best.ckpt"
            want = f"{lone[0]}.best.ckpt" if lone[0] in configs else f"{lone[0]}.config.json"
            raise UserError(f"{folder} has {have} but no {want}: CellPLM needs both files of the release")
        raise UserError(f"{folder} has no CellPLM checkpoint (<name>.best.ckpt with <name>.config.json): "
                        "download both files of the release into it")
    return folder / f"{pairs[0]}.config.json", folder / f"{pairs[0]}.best.ckpt"


def read_state_dict(path: Path) -> dict:
    """The checkpoint's ``model_state_dict``, read without running pickled code (``weights_only``)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a tensor-only torch checkpoint ({type(e).__name__}): if it is "
                        "the release and you trust it, re-save its model_state_dict alone with "
                        "torch.save({'model_state_dict': ...})") from None
    sd = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path} has no model_state_dict of tensors: is it a CellPLM .best.ckpt?")
    return sd


# ---- weights the embedding does not use: declared names and shapes ---------------------------
def norm_keys(prefix: str, n: int) -> dict:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def unused_keys(cfg: CellPLMConfig) -> tuple[dict, dict]:
    """``(required, decoder)``: the names and shapes of the weights the official model builds but
    does not run for an embedding. ``required`` belong to the embedding model itself
    (``OmicsFormer(head_type='embedder')``); ``decoder`` is the training model's NB decoder."""
    required = {**norm_keys("embedder.norm0", cfg.hid)}                       # omics.py: created, unused
    if cfg.pe:                                                                # utils/pe.py::Sinusoidal2dPE
        required.update({"embedder.pe_enc.missing_pe": (cfg.hid,),
                         "embedder.pe_enc.pe_enc.weight": (PE_POSITIONS, cfg.hid)})
    inf = "latent.layers.1.inference"
    required.update({f"{inf}.inference_qzyx.2.var.weight": (cfg.latent, QZYX_HIDDEN),
                     f"{inf}.inference_qzyx.2.var.bias": (cfg.latent,),
                     f"{inf}.y_mu.weight": (cfg.latent, cfg.clusters), f"{inf}.y_mu.bias": (cfg.latent,),
                     f"{inf}.y_var.weight": (cfg.latent, cfg.clusters), f"{inf}.y_var.bias": (cfg.latent,)})
    decoder = {}
    has_covariates = sum(n for _, n in cfg.covariates) > 0
    for i in range(cfg.dec_layers - 1):                                       # zinb.py::NBMLPDecoder
        dim = cfg.latent if i == 0 else cfg.dec_hid
        p = f"decoder.layers.{i}"
        decoder.update({f"{p}.0.weight": (cfg.dec_hid, dim), f"{p}.0.bias": (cfg.dec_hid,), f"{p}.1.weight": (1,),
                        **norm_keys(f"{p}.3", cfg.dec_hid)})
        if has_covariates:
            for cov, n in cfg.covariates:
                if n > 0:
                    c = f"decoder.covariate_layers.{i}.{cov}"          # Embedding, PReLU, norm
                    decoder.update({f"{c}.0.weight": (n, cfg.dec_hid), f"{c}.1.weight": (1,),
                                    **norm_keys(f"{c}.2", cfg.dec_hid)})
    decoder.update({"decoder.out_layer.dec_1.weight": (NB_HIDDEN, cfg.dec_hid),
                    "decoder.out_layer.dec_1.bias": (NB_HIDDEN,),
                    "decoder.out_layer.dec_mean.0.weight": (cfg.out_dim, NB_HIDDEN),
                    "decoder.out_layer.dec_mean.0.bias": (cfg.out_dim,),
                    "decoder.out_layer.dec_disp": (cfg.out_dim,)})
    return required, decoder


def check_keys(state: dict, used: dict, cfg: CellPLMConfig, ckpt: Path) -> None:
    """Refuse (one line) a checkpoint with a missing, unexpected or mis-sized weight."""
    required, decoder = unused_keys(cfg)
    expected = {**used, **required}
    if any(k in state for k in decoder):      # the training model's decoder: all of it, or none
        expected.update(decoder)
    problems = key_mismatches(state, expected)
    if problems:
        raise UserError(f"{ckpt.name} does not match its config (strict loading): {problems}: "
                        "use the .best.ckpt released with this .config.json")


# ---- the model: the official module tree, used parts only --------------------------------------
def build_model(cfg: CellPLMConfig):
    """An ``nn.Module`` whose ``state_dict`` names are the official ones, holding only the weights
    the embedding uses. Dropouts are ``Identity`` (inference only); the forward pass is
    :func:`embed_cells`."""
    import torch
    from torch import nn

    def norm(n):                       # utils/__init__.py::create_norm
        return nn.GroupNorm(4, n) if cfg.norm == "groupnorm" else nn.LayerNorm(n)

    def module(**children):
        m = nn.Module()
        for name, child in children.items():
            setattr(m, name, child)
        return m

    def flowformer_layer(d):           # layer/flowformer.py::FlowformerLayer
        attn = module(query_projection=nn.Linear(d, d), key_projection=nn.Linear(d, d),
                      value_projection=nn.Linear(d, d), out_projection=nn.Linear(d, d))
        ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Identity(), nn.Linear(2 * d, d), nn.Identity())
        return module(self_attn=attn, _ff_block=ff, norm1=nn.LayerNorm(d), norm2=nn.LayerNorm(d))

    d = cfg.hid
    inference = module(inference_qyx=nn.ModuleList([module(logits=nn.Linear(d, cfg.clusters))]),
                       inference_qzyx=nn.ModuleList([nn.Linear(d + cfg.clusters, QZYX_HIDDEN), nn.ReLU(),
                                                     module(mu=nn.Linear(QZYX_HIDDEN, cfg.latent))]))
    return module(
        embedder=module(feat_enc=module(emb=nn.Parameter(torch.zeros(len(cfg.genes), d))),
                        extra_linear=nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Identity(), norm(d))),
        encoder=module(layers=nn.ModuleList([flowformer_layer(d) for _ in range(cfg.layers)])),
        pre_latent_norm=module(norm=nn.LayerNorm(d)),
        latent=module(layers=nn.ModuleList([nn.Identity(), module(inference=inference)])),
    ).eval()


def flow_attention(attn, x, heads: int):
    """Flow attention (layer/flowformer.py::Flow_Attention) over the rows of ``x`` (cells x d): every
    cell is a query and a key. Projections run under the caller's autocast; the flow
    normalisation runs in fp32."""
    import torch

    n, d = x.shape

    def split(t):                      # (n, d) -> (heads, n, d / heads)
        return t.float().view(n, heads, d // heads).transpose(0, 1)

    q = split(torch.sigmoid(attn.query_projection(x).float()))
    k = split(torch.sigmoid(attn.key_projection(x).float()))
    v = split(attn.value_projection(x))
    with torch.autocast(device_type=x.device.type, enabled=False):
        eps = FLOW_EPS
        sink_in = 1.0 / torch.einsum("hnd,hd->hn", q + eps, k.sum(1) + eps)        # incoming flow of each query
        source_out = 1.0 / torch.einsum("hnd,hd->hn", k + eps, q.sum(1) + eps)     # outgoing flow of each key
        conserved_sink = torch.einsum("hnd,hd->hn", q + eps, (k * source_out[..., None]).sum(1) + eps)
        conserved_source = torch.einsum("hnd,hd->hn", k + eps, (q * sink_in[..., None]).sum(1) + eps)
        conserved_source = conserved_source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(conserved_sink)             # x (queries / keys) = 1: same cells
        competition = torch.softmax(conserved_source, dim=-1) * n
        kv = torch.einsum("hnd,hne->hde", k, v * competition[..., None])
        out = torch.einsum("hnd,hde->hne", q * sink_in[..., None], kv) * allocation[..., None]
    return attn.out_projection(out.transpose(0, 1).reshape(n, d))


def embed_cells(model, x, heads: int):
    """Cell embeddings (cells x post_latent_dim) of one batch; ``x`` is a sparse COO tensor of
    log1p counts over the model's genes (cells x genes). The cells attend to each other."""
    import torch

    with torch.autocast(device_type=x.device.type, enabled=False):
        h = torch.sparse.mm(x, model.embedder.feat_enc.emb)                    # sum_g log1p(c_g) emb[g], fp32
    h = model.embedder.extra_linear(h)
    for layer in model.encoder.layers:                                          # pre-norm
        h = h + flow_attention(layer.self_attn, layer.norm1(h), heads)
        h = h + layer._ff_block(layer.norm2(h))
    h = model.pre_latent_norm.norm(h)
    inference = model.latent.layers[1].inference
    logits = inference.inference_qyx[0].logits(h)
    y = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(h.dtype)  # argmax, not a Gumbel draw
    hidden = inference.inference_qzyx[1](inference.inference_qzyx[0](torch.cat([h, y], dim=1)))
    return inference.inference_qzyx[2].mu(hidden)


def sparse_tensor(x: sp.csr_matrix):
    """A canonical scipy CSR matrix as a coalesced torch COO tensor (float32), the official input
    format (``utils/data.py::sparse_scipy_to_tensor``)."""
    import torch

    coo = x.tocoo()                     # canonical CSR -> sorted, duplicate-free COO
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data.astype(np.float32)), size=coo.shape,
                                   dtype=torch.float32, is_coalesced=True, check_invariants=False)


def cell_groups(n: int, size: int) -> list[tuple[int, int]]:
    """``grouping=chunk``: consecutive row ranges covering ``n`` rows (a store chunk), ceil(n / size)
    groups of near-equal size."""
    if n == 0:
        return []
    k = -(-n // size)
    bounds = np.cumsum([0] + [n // k + (i < n % k) for i in range(k)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def runs(n: int, size: int) -> list[tuple[int, int]]:
    """``grouping=official`` without a batch column: consecutive runs of ``size`` rows from row 0,
    the last run holding the remainder."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def batch_codes(values) -> tuple[np.ndarray, int]:
    """``(codes, k)``: each cell's batch value as 0..k-1, the values numbered in sorted order (as
    sklearn's ``LabelEncoder`` numbers them in the official ``TranscriptomicDataset``); missing
    values (NaN, None) count as one value of their own, numbered last."""
    import pandas as pd

    values = pd.Series(np.asarray(values, dtype=object))
    missing = values.isna().to_numpy()
    present = values[~missing]
    try:
        found, uniques = pd.factorize(present, sort=True)
    except TypeError:                                   # values of several types: sort them by type, then text
        found, uniques = pd.factorize(present.map(lambda v: f"{type(v).__name__}\0{v}"), sort=True)
    k = len(uniques)
    codes = np.full(len(values), k, dtype=np.int64)
    codes[~missing] = found
    return codes, k + int(missing.any())


class Grouping:
    """A dataset's forward-pass groups under ``grouping=official``: group ``g`` is the store rows
    ``order[bounds[g]:bounds[g + 1]]`` (ascending); ``order`` None stands for ``0..n-1``."""

    def __init__(self, n: int, bounds: np.ndarray, order: np.ndarray | None = None, values: int = 0):
        self.n, self.bounds, self.order, self.values = n, np.asarray(bounds, dtype=np.int64), order, values
        self._group_of = None

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def rows(self, g: int) -> np.ndarray:
        lo, hi = int(self.bounds[g]), int(self.bounds[g + 1])
        return np.arange(lo, hi, dtype=np.int64) if self.order is None else self.order[lo:hi]

    def groups(self) -> list[np.ndarray]:
        return [self.rows(g) for g in range(len(self))]

    def overlapping(self, lo: int, hi: int) -> np.ndarray:
        """The groups that hold any of the store rows ``lo`` to ``hi - 1``, ascending."""
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        if self.order is None:
            first, last = np.searchsorted(self.bounds, [lo, hi - 1], side="right") - 1
            return np.arange(first, last + 1, dtype=np.int64)
        if self._group_of is None:
            self._group_of = np.empty(self.n, dtype=np.int64)
            self._group_of[self.order] = np.repeat(np.arange(len(self)), np.diff(self.bounds))
        return np.unique(self._group_of[lo:hi])


def official_groups(n: int, size: int, labels=None) -> Grouping:
    """The official grouping (``pipeline/cell_embedding.py::CellEmbeddingPipeline._inference`` over
    ``utils/data.py::TranscriptomicDataset``): without ``labels``, consecutive runs of ``size`` cells
    from the first, the last run holding the remainder; with ``labels`` (the ``obs['batch']`` values),
    the same within each batch value: the value's cells in store order, cut into runs of ``size``
    from its first cell. The values come in sorted order (which changes no embedding)."""
    if labels is None:
        return Grouping(n, np.r_[np.arange(0, n, size), n])
    codes, k = batch_codes(labels)
    if len(codes) != n:
        raise ValueError(f"{len(codes)} batch labels for {n} cells")
    order = np.argsort(codes, kind="stable")           # value by value, store order within a value
    counts = np.bincount(codes, minlength=k)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    bounds = np.concatenate([start + np.arange(0, count, size) for start, count in zip(starts, counts)] + [[n]])
    return Grouping(n, bounds, order, k)


def read_rows(source, rows: np.ndarray, window: int = 4096) -> sp.csr_matrix:
    """The source's store rows ``rows`` (ascending), in that order: consecutive rows in one read,
    scattered ones by windows of at most ``window`` rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0 or rows[-1] - rows[0] + 1 == len(rows):
        lo = int(rows[0]) if len(rows) else 0
        return sp.csr_matrix(source.rows(lo, lo + len(rows)))
    parts, i = [], 0
    while i < len(rows):
        lo = int(rows[i])
        j = int(np.searchsorted(rows, lo + window, side="left"))
        block = sp.csr_matrix(source.rows(lo, int(rows[j - 1]) + 1))
        parts.append(block[rows[i:j] - lo])
        i = j
    return sp.vstack(parts, format="csr")


# ---- genes ----------------------------------------------------------------------------------
def read_gene_map(path: Path) -> dict:
    """symbol -> Ensembl ID from a pickled dict or a two-column TSV/CSV (a header row is skipped)."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        try:
            with open(path, "rb") as f:
                value = pickle.load(f)
        except Exception as e:
            raise UserError(f"cannot read the gene map {path}: {type(e).__name__}") from None
        if not isinstance(value, dict):
            raise UserError(f"gene map {path} is not a dictionary of symbol -> Ensembl ID")
        pairs = value.items()
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the gene map {path}: {type(e).__name__}") from None
        first = next((line for line in text.splitlines() if line.strip()), "")
        rows = [r for r in csv.reader(text.splitlines(), delimiter="\t" if "\t" in first else ",") if len(r) >= 2]
        if rows and not re.match(r"ENS[A-Z]*G\d", rows[0][1].strip().upper()):
            rows = rows[1:]                                                   # a header
        pairs = [(r[0], r[1]) for r in rows]
    out = {}
    for symbol, ensembl in pairs:
        symbol, ensembl = str(symbol).strip(), str(ensembl).strip().split(".")[0].upper()
        if symbol and ensembl:
            out.setdefault(symbol, ensembl)
    if not out:
        raise UserError(f"gene map {path} has no symbol -> Ensembl ID pairs: give two columns, symbol then ID")
    return out


def match_genes(ids, genes, first_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(source columns, model gene indices)`` of the source genes in the model's gene list, in
    source order; ``first_only`` keeps one column per model gene."""
    where = {g: i for i, g in enumerate(genes)}
    cols, idx, seen = [], [], set()
    for c, g in enumerate(ids):
        i = where.get(g)
        if i is None or (first_only and i in seen):
            continue
        seen.add(i)
        cols.append(c)
        idx.append(i)
    return np.array(cols, dtype=np.int64), np.array(idx, dtype=np.int64)


@dataclass
class GeneMatch:
    """One dataset's source columns in the model's gene list and how they were found."""

    cols: np.ndarray
    gene_idx: np.ndarray
    n_genes: int               # the model's gene-list length
    facts: dict

    def prepare(self, block) -> sp.csr_matrix:
        """log1p counts as cells x model genes (a repeated gene's columns add up)."""
        x = sp.csr_matrix(block)[:, self.cols].tocsr()
        data = np.log1p(x.data.astype(np.float64)).astype(np.float32)
        out = sp.csr_matrix((data, self.gene_idx[x.indices], x.indptr), shape=(x.shape[0], self.n_genes))
        out.sum_duplicates()
        return out


class _CellRows:
    """The rows of a prepared block, one item per cell (fine-tuning)."""

    def __init__(self, x: sp.csr_matrix):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def lengths(self) -> np.ndarray:
        return np.ones(self.x.shape[0], dtype=np.int64)

    def __getitem__(self, i: int):
        return i, self.x[i]


class DatasetEncoder:
    """One dataset's embeddings. Called with a block, it embeds the block as a dataset of its own
    (:meth:`CellPLM.embed_block`); :meth:`rows` gives store rows of the dataset (one chunk at a time,
    for the runner): under ``grouping=official`` each from the whole group that holds it, its other
    rows read from the source, so the result depends neither on the chunk size nor on which
    process computes a chunk. A group that reaches past the chunk is kept for the next chunks."""

    def __init__(self, backbone: "CellPLM", source, match: GeneMatch, grouping: Grouping | None):
        self.backbone, self.source, self.match, self.grouping = backbone, source, match, grouping
        self.kept: dict = {}             # group -> (rows, embeddings) of groups reaching past the last chunk
        self.computed = 0                # groups run through the model (tests)

    def __call__(self, block: sp.csr_matrix) -> np.ndarray:
        return self.backbone.embed_block(block, self.match)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        if self.grouping is None:
            return self(self.source.rows(lo, hi))
        out = np.empty((hi - lo, self.backbone.dim), dtype=np.float32)
        for g in self.grouping.overlapping(lo, hi).tolist():
            if g in self.kept:
                rows, emb = self.kept[g]
            else:
                rows = self.grouping.rows(g)
                emb = self.backbone.forward(self.match.prepare(read_rows(self.source, rows)))
                self.computed += 1
            inside = (rows >= lo) & (rows < hi)
            out[rows[inside] - lo] = emb[inside]
            if rows[-1] >= hi:
                self.kept[g] = (rows, emb)
        self.kept = {g: v for g, v in self.kept.items() if v[0][-1] >= hi}
        return out


def _stack_rows(items):
    """Collate ``(index, 1-row CSR)`` items: the indices and the rows stacked in batch order."""
    import torch

    return torch.tensor([i for i, _ in items]), sp.csr_matrix(sp.vstack([row for _, row in items]))


# ---- the backbone ---------------------------------------------------------------------------
@register
class CellPLM(TorchBackbone):
    name = "cellplm"
    summary = "CellPLM (flow attention across the cells of a batch); GMVAE latent mean"
    default_dim = 512
    requires = ("torch",)
    options = {
        "precision": TorchBackbone.options["precision"],
        "name": Option("", "checkpoint NAME of NAME.best.ckpt + NAME.config.json (default: the only pair)"),
        "gene_map": Option("", "symbol -> Ensembl ID map (.pkl dict, or TSV/CSV) for datasets with symbols only "
                               "(default: gene_name_id_dict*.pkl or gene_map*.tsv|csv in --model-dir)"),
        "batch_cells": Option(DEFAULT_BATCH_CELLS, "cells per forward pass; they attend to each other", int),
        "grouping": Option("official", "official: consecutive runs of batch_cells cells over the dataset (within "
                                       "each batch_col value), the last run the remainder, as the official "
                                       "CellEmbeddingPipeline; chunk: each store chunk cut into near-equal groups"),
        "batch_col": Option(BATCH_COL, "obs column whose values the official grouping keeps apart, when the "
                                       "dataset has it (empty: none)"),
    }
    cells_attend = True

    # LoRA targets (``scdrugmap finetune``): the flow attention's four projections and the encoder
    # layers' feed-forward layers
    lora_attention = (r"self_attn\.(query|key|value|out)_projection",)
    lora_mlp = (r"_ff_block\.[03]",)
    # cells per training step: they attend to each other, as in an embedding batch
    finetune_batch_size = 256

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import torch

        given = kwargs.get("batch_size")
        if "batch_cells" in (kwargs.get("options") or {}):
            if given and given != self.config["batch_cells"]:
                raise UserError(f"--batch-size {given} and --option batch_cells={self.config['batch_cells']} "
                                "disagree: give one of them")
            self.batch_cells = self.config["batch_cells"]
        else:
            self.batch_cells = given or DEFAULT_BATCH_CELLS
        if self.batch_cells < 1:
            raise UserError(f"cells per batch must be at least 1 (got {self.batch_cells})")
        self.batch_size = self.batch_cells
        self.grouping = self.config["grouping"]
        if self.grouping not in GROUPINGS:
            raise UserError(f"--option grouping={self.grouping}: use official (the official CellPLM batches) or "
                            "chunk (near-equal groups inside each store chunk)")
        self.batch_col_given = "batch_col" in (kwargs.get("options") or {})
        self.batch_col = self.config["batch_col"].strip() if self.grouping == "official" else ""
        if self.batch_col_given and self.grouping != "official":
            raise UserError("--option batch_col applies to grouping=official only: cells grouped by store "
                            "chunk ignore batch values")
        self.model_dir = Path(self.model_dir)
        self.config_path, self.ckpt_path = find_checkpoint(self.model_dir, self.config["name"])
        self.cfg = CellPLMConfig.read(self.config_path)
        self.gene_map_path = self._gene_map_path()
        state = read_state_dict(self.ckpt_path)
        model = build_model(self.cfg)
        used = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(state, used, self.cfg, self.ckpt_path)
        with torch.no_grad():
            model.load_state_dict({k: state[k] for k in used}, strict=True)
        self.model = model.to(self.device).eval()
        self._matched: dict = {}
        self._groupings: dict = {}
        self._gene_map: dict | None = None

    @property
    def dim(self) -> int:
        return self.cfg.latent

    def checkpoint_sha256(self) -> str:
        return sha256_files([self.config_path, self.ckpt_path])

    # -- genes ----------------------------------------------------------------------------------
    def _gene_map_path(self) -> Path | None:
        if self.config["gene_map"]:
            path = Path(self.config["gene_map"])
            if not path.is_file():
                raise UserError(f"--option gene_map={path}: no such file")
            return path
        found = sorted({p for pattern in GENE_MAP_PATTERNS for p in self.model_dir.glob(pattern)})
        if len(found) > 1:
            raise UserError(f"{self.model_dir} holds several gene maps ({', '.join(p.name for p in found)}): "
                            "keep one, or choose with --option gene_map=FILE")
        return found[0] if found else None

    def gene_ids(self, source) -> tuple[np.ndarray, dict]:
        """Ensembl IDs of the source's genes ('' where unknown) and how they were obtained."""
        ids = source.ensembl_ids()
        if ids is not None:
            return np.char.upper(np.asarray(ids, dtype=str)), {"gene_ids": "ensembl (source)"}
        if self.gene_map_path is None:
            raise UserError(f"dataset {source.name!r} has gene symbols only and CellPLM needs Ensembl IDs: pass "
                            "--option gene_map=FILE (a symbol -> Ensembl TSV/CSV, or Geneformer's "
                            "gene_name_id_dict.pkl), or put such a file in --model-dir")
        if self._gene_map is None:
            exact = read_gene_map(self.gene_map_path)
            folded = {}
            for symbol, ensembl in exact.items():
                folded.setdefault(symbol.upper(), ensembl)
            self._gene_map = (exact, folded)
        exact, folded = self._gene_map
        symbols = source.symbols(upper=False)
        ids = np.array([exact.get(s) or folded.get(s.upper(), "") for s in symbols], dtype=object).astype(str)
        return ids, {"gene_ids": "symbols mapped offline", "gene_map": self.gene_map_path.name,
                     "gene_map_sha256": sha256_files([self.gene_map_path]),
                     "genes_mapped": int(sum(1 for i in ids if i))}

    def matching(self, source) -> GeneMatch:
        if source.name not in self._matched:
            ids, facts = self.gene_ids(source)
            symbols_route = "gene_map" in facts
            cols, idx = match_genes(ids, self.cfg.genes, first_only=symbols_route)
            if len(cols) < max(1, MIN_MATCHED * len(ids)):
                raise UserError(f"dataset {source.name!r}: only {len(cols)} of {len(ids)} genes are in the CellPLM "
                                "gene list: check that its genes are human Ensembl IDs, or symbols with a gene map "
                                "that covers them")
            facts = {**facts, "genes_matched": int(len(cols)), "model_genes_used": int(len(np.unique(idx)))}
            self._matched[source.name] = GeneMatch(cols, idx, len(self.cfg.genes), facts)
        return self._matched[source.name]

    # -- embedding ------------------------------------------------------------------------------
    def groups_of(self, source) -> Grouping | None:
        """The dataset's groups under ``grouping=official`` (None under ``grouping=chunk``)."""
        if self.grouping != "official":
            return None
        if source.name not in self._groupings:
            labels = None
            if self.batch_col:
                labels = source.obs_column(self.batch_col)
                if labels is None and self.batch_col_given:
                    raise UserError(f"dataset {source.name!r} has no obs column {self.batch_col!r} "
                                    f"(--option batch_col={self.batch_col}): name a column it has, or give "
                                    "batch_col= to group the cells without one")
            self._groupings[source.name] = official_groups(source.n_cells, self.batch_cells, labels)
        return self._groupings[source.name]

    def encoder(self, source) -> "DatasetEncoder":
        match = self.matching(source)       # checks the genes before anything is written
        return DatasetEncoder(self, source, match, self.groups_of(source))

    def embed_rows(self, source, encode: "DatasetEncoder", lo: int, hi: int) -> np.ndarray:
        """Store rows ``lo`` to ``hi - 1`` from the whole groups that hold them (``grouping=official``),
        or from the chunk's own rows cut into near-equal groups (``grouping=chunk``)."""
        return encode.rows(lo, hi)

    def block_groups(self, n: int) -> list[tuple[int, int]]:
        """The groups of a block of ``n`` rows taken as a dataset of its own (no batch column)."""
        return runs(n, self.batch_cells) if self.grouping == "official" else cell_groups(n, self.batch_cells)

    def embed_block(self, block: sp.csr_matrix, match: GeneMatch) -> np.ndarray:
        """A block of cells taken as a dataset of its own, no batch column: groups of consecutive
        rows (:meth:`block_groups`), one forward pass each; no length sorting, nothing random."""
        x = match.prepare(block)
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for lo, hi in self.block_groups(x.shape[0]):
            out[lo:hi] = self.forward(x[lo:hi])
        return out

    def forward(self, x: sp.csr_matrix) -> np.ndarray:
        """One forward pass: the prepared rows ``x`` attend to each other."""
        import torch

        with torch.inference_mode(), self.autocast():
            emb = embed_cells(self.model, sparse_tensor(x).to(self.device), self.cfg.heads)
            return emb.float().cpu().numpy()

    # -- fine-tuning ----------------------------------------------------------------------------
    def finetune_cells(self, source, block):
        """A cell's input is its row of log1p counts over the model's genes (no tokens): every
        cell has length 1, so scoring batches are runs of ``--batch-size`` consecutive cells of a
        store chunk (extraction groups cells as the module docstring says) and training batches
        random sets of cells; the cells of a batch attend to each other."""
        return _CellRows(self.matching(source).prepare(block))

    def finetune_collate(self):
        return _stack_rows

    def finetune_embed(self, batch):
        """The cells of the batch attend to each other (one flow-attention sequence)."""
        _, x = batch
        return embed_cells(self.model, sparse_tensor(x).to(self.device), self.cfg.heads)

    def dataset_params(self, source) -> dict:
        facts = dict(self.matching(source).facts)
        grouping = self.groups_of(source)
        if grouping is not None:
            facts.update({"batch_col_used": grouping.order is not None,
                          "batch_values": grouping.values if grouping.order is not None else None,
                          "groups": len(grouping)})
        return facts

    def params(self) -> dict:
        return {"precision": self.precision, "checkpoint": self.config_path.name[: -len(".config.json")],
                "batch_cells": self.batch_cells, "batch_size": self.batch_cells, "grouping": self.grouping,
                "batch_col": self.batch_col or None,
                "batching": BATCHING[self.grouping],
                "order": "store order", "latent": LATENT, "input": "log1p(raw counts) x gene embedding",
                "model_genes": len(self.cfg.genes), "layers": self.cfg.layers, "heads": self.cfg.heads,
                "flow_attention_precision": "fp32"}
