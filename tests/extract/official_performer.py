"""Randomly initialised scBERT and cellLM checkpoints in the official release layouts.

The key names and shapes are written out here from the official code, not from scdrugmap's
module, so a wrong name there fails the strict load:

* ``PerformerLM`` of github.com/TencentAILabHealthcare/scBERT @ 262fd4b
  (``performer_pytorch/performer_pytorch.py``), built by ``predict.py``/``finetune.py`` as
  ``PerformerLM(num_tokens=7, dim=200, depth=6, max_seq_len=16907, heads=10, local_attn_heads=0,
  g2v_position_emb=True)``;
* ``PerformerLM_CellLM`` of github.com/PharMolix/OpenBioMed @ ce3ccab
  (``open_biomed/models/cell/performer_celllm.py``), built from ``configs/ctc/cellLM.json``.

Both: ``token_emb`` (Embedding), ``pos_emb.emb`` (``Gene2VecPositionalEmbedding``: the gene2vec
array plus one zero row (scBERT) or one ones row and one zero row (cellLM), float64),
``performer`` (``Performer``: its buffer ``calls_since_last_redraw``, then ``net``, a
``SequentialSequence`` whose ``layers`` hold ``[PreLayerNorm(SelfAttention), PreLayerNorm(Chunk(
FeedForward))]`` per layer), ``norm`` (LayerNorm) and ``to_out`` (Linear(dim, num_tokens)).
``SelfAttention``: ``fast_attention.projection_matrix`` (buffer, nb_features x dim_head), ``to_q``,
``to_k``, ``to_v`` (qkv_bias=False), ``to_out`` (bias). ``FeedForward``: ``w1``, ``w2``.

The auxiliary files get the real names with small shapes: ``gene2vec_16906.npy`` /
``gene2vec_19379_512.npy`` (genes x dim), ``panglao_10000.h5ad`` (its ``var_names`` are scBERT's
gene order), ``cellLM.json`` (the real config with sizes overridden), ``gene_list.txt``.
Used by the tests; needs neither pytest nor conftest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from checkpoints import PC9, SHARED, _missing

CELLLM_CONFIG = SHARED / "backbone_assets" / "cellLM" / "cellLM_ctc.json"
SCBERT_CKPT, SCBERT_GENES, SCBERT_G2V = "panglao_pretrain.pth", "panglao_10000.h5ad", "gene2vec_16906.npy"
CELLLM_CKPT, CELLLM_CFG, CELLLM_G2V = "checkpoint4_fixed.pth", "cellLM.json", "gene2vec_19379_512.npy"
# release sizes (for key-list checks) and small test sizes
SCBERT_RELEASE = dict(num_tokens=7, dim=200, depth=6, heads=10, pos_rows=16906 + 1)
CELLLM_RELEASE = dict(num_tokens=8, dim=512, depth=10, heads=16, pos_rows=19379 + 2)
SCBERT_SMALL = dict(num_tokens=7, dim=16, depth=2, heads=2)
CELLLM_SMALL = dict(dim=32, depth=2, heads=2, max_seq_len=128)   # PC9: some cells truncated, some not


def performer_lm_keys(num_tokens, dim, depth, heads, pos_rows, dim_head=64, nb_features=None, ff_mult=4) -> dict:
    """Every ``state_dict`` name of the official ``PerformerLM`` -> its shape, in state-dict order."""
    nb_features = nb_features or int(dim_head * math.log(dim_head))       # FastAttention default
    inner = heads * dim_head
    keys = {"token_emb.weight": (num_tokens, dim), "pos_emb.emb.weight": (pos_rows, dim),
            "performer.calls_since_last_redraw": ()}
    for i in range(depth):
        p = f"performer.net.layers.{i}"
        keys.update({f"{p}.0.norm.weight": (dim,), f"{p}.0.norm.bias": (dim,),
                     f"{p}.0.fn.fast_attention.projection_matrix": (nb_features, dim_head),
                     f"{p}.0.fn.to_q.weight": (inner, dim), f"{p}.0.fn.to_k.weight": (inner, dim),
                     f"{p}.0.fn.to_v.weight": (inner, dim),
                     f"{p}.0.fn.to_out.weight": (dim, inner), f"{p}.0.fn.to_out.bias": (dim,),
                     f"{p}.1.norm.weight": (dim,), f"{p}.1.norm.bias": (dim,),
                     f"{p}.1.fn.fn.w1.weight": (dim * ff_mult, dim), f"{p}.1.fn.fn.w1.bias": (dim * ff_mult,),
                     f"{p}.1.fn.fn.w2.weight": (dim, dim * ff_mult), f"{p}.1.fn.fn.w2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,), "to_out.weight": (num_tokens, dim),
                 "to_out.bias": (num_tokens,)})
    return keys


def orthogonal_features(nb_rows: int, nb_columns: int, generator):
    """``gaussian_orthogonal_random_matrix(scaling=0)``: stacked orthogonal blocks (Q of a Gaussian
    square matrix, transposed), each row scaled by the norm of a Gaussian row."""
    import torch

    blocks = []
    for _ in range(-(-nb_rows // nb_columns)):
        q, _ = torch.linalg.qr(torch.randn(nb_columns, nb_columns, generator=generator))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:nb_rows]
    return torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)[:, None] * rows


def random_state(keys: dict, gene2vec: np.ndarray, extra_rows: list, seed: int = 0, qk_scale: float = 0.5) -> dict:
    """Weights of sensible scale. ``pos_emb.emb.weight`` is built as the official
    ``Gene2VecPositionalEmbedding`` does: the gene2vec array + ``extra_rows``, float64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        if name == "pos_emb.emb.weight":
            table = np.concatenate([gene2vec] + [np.full((1, gene2vec.shape[1]), v) for v in extra_rows], axis=0)
            t = torch.from_numpy(table)                                  # float64, as np.concatenate gives
        elif name == "performer.calls_since_last_redraw":
            t = torch.tensor(0)
        elif name.endswith("projection_matrix"):
            t = orthogonal_features(*shape, g)
        elif name == "token_emb.weight":
            t = torch.randn(shape, generator=g)
        elif name.endswith(("to_q.weight", "to_k.weight")):
            t = qk_scale * torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith(".weight") and len(shape) == 2:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith(".weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)              # LayerNorm scales
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        state[name] = t
    assert set(state) == set(keys) and all(tuple(state[k].shape) == tuple(s) for k, s in keys.items())
    return state


def _save(path: Path, state: dict, epoch: int = 4):
    """``utils.save_ckpt``'s dict (optimizer and scheduler states abridged)."""
    import torch

    torch.save({"epoch": epoch, "model_state_dict": state,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999),
                                                                        "params": [0, 1]}]},
                "scheduler_state_dict": {"last_epoch": epoch, "base_lrs": [1e-4]}, "losses": 1.25}, path)


# ---- scBERT ---------------------------------------------------------------------------------
def save_scbert(folder: Path, genes: list, gene_list: str = "h5ad", seed: int = 0, state_edit=None,
                **sizes) -> Path:
    """``folder/panglao_pretrain.pth`` + ``gene2vec_16906.npy`` + the gene order, as
    ``panglao_10000.h5ad`` (``gene_list="h5ad"``), ``gene_list.txt`` ("txt") or nothing (None)."""
    sizes = {**SCBERT_SMALL, **sizes}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gene2vec = rng.normal(0, 0.5, (len(genes), sizes["dim"])).astype(np.float32)
    np.save(folder / SCBERT_G2V, gene2vec)
    state = random_state(performer_lm_keys(pos_rows=len(genes) + 1, **sizes), gene2vec, [0.0], seed)
    if state_edit is not None:
        state_edit(state)
    _save(folder / SCBERT_CKPT, state)
    if gene_list == "h5ad":
        write_panglao_like(folder / SCBERT_GENES, genes)
    elif gene_list == "txt":
        (folder / "gene_list.txt").write_text("\n".join(genes) + "\n")
    return folder


def write_panglao_like(path: Path, genes: list) -> Path:
    """A 3-cell AnnData whose ``var_names`` are the gene order, as ``panglao_10000.h5ad``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    X = sp.csr_matrix(np.ones((3, len(genes)), dtype=np.float32))
    ad.AnnData(X=X, obs=pd.DataFrame(index=["c0", "c1", "c2"]), var=pd.DataFrame(index=list(genes))).write_h5ad(path)
    return path


# ---- cellLM ---------------------------------------------------------------------------------
def celllm_config(**overrides) -> dict:
    if not CELLLM_CONFIG.exists():
        _missing("cellLM config (backbone_assets/cellLM/cellLM_ctc.json)")
    cfg = json.loads(CELLLM_CONFIG.read_text())
    cfg["network"]["structure"].update(overrides)
    return cfg


def save_celllm(folder: Path, genes: list, gene_list: bool = True, seed: int = 1, state_edit=None,
                **overrides) -> Path:
    """``folder/cellLM.json`` (the real config, sizes overridden, ``gene_num`` = len(genes)) +
    ``checkpoint4_fixed.pth`` + ``gene2vec_19379_512.npy`` + ``gene_list.txt``."""
    cfg = celllm_config(**{**CELLLM_SMALL, "gene_num": len(genes), **overrides})
    s = cfg["network"]["structure"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CELLLM_CFG).write_text(json.dumps(cfg, indent=4))
    rng = np.random.default_rng(seed)
    gene2vec = rng.normal(0, 0.5, (s["gene_num"], s["dim"])).astype(np.float32)
    np.save(folder / CELLLM_G2V, gene2vec)
    keys = performer_lm_keys(s["num_tokens"], s["dim"], s["depth"], s["heads"], pos_rows=s["gene_num"] + 2)
    state = random_state(keys, gene2vec, [1.0, 0.0], seed)                       # CLS ones row, PAD zeros row
    if state_edit is not None:
        state_edit(state)
    _save(folder / CELLLM_CKPT, state)
    if gene_list:
        (folder / "gene_list.txt").write_text("\n".join(genes) + "\n")
    return folder


# ---- a gene order that overlaps PC9 -------------------------------------------------------------
def pc9_gene_order(n_detected: int = 150, n_random: int = 200, n_absent: int = 20, seed: int = 0) -> list:
    """A shuffled gene list: PC9's ``n_detected`` most often detected genes, ``n_random`` other PC9
    genes and ``n_absent`` symbols not in PC9 (zero-filled)."""
    import anndata as ad
    import scipy.sparse as sp

    if not PC9.exists():
        _missing("PC9 data (data/pc9_erlotinib.h5ad)")
    a = ad.read_h5ad(PC9)
    names = np.asarray(a.var_names.astype(str))
    detected = np.asarray((sp.csr_matrix(a.X) > 0).sum(0)).ravel()
    order = np.argsort(-detected, kind="stable")
    rng = np.random.default_rng(seed)
    top = list(names[order[:n_detected]])
    rest = list(rng.choice(names[order[n_detected:]], n_random, replace=False))
    genes = top + rest + [f"NOTINPC9-{i}" for i in range(n_absent)]
    return [str(g) for g in rng.permutation(genes)]


# ---- plain-torch reference of the official forward (float64) ---------------------------------------
def reference_kernel(x, projection, is_query: bool):
    """``softmax_kernel`` as written in the official code: the key-side maximum is one maximum over
    the whole tensor (batch, heads, positions, features)."""
    import torch

    c = x.shape[-1] ** -0.25
    dash = (c * x) @ projection.T
    diag = (x ** 2).sum(-1, keepdim=True) / 2.0 * c ** 2
    stab = dash.max(-1, keepdim=True).values if is_query else dash.max()
    return projection.shape[0] ** -0.5 * (torch.exp(dash - diag - stab) + 1e-4)


def reference_attention(q, k, v, projection):
    """``linear_attention`` (non-causal), head by head: out_i = q'_i (K'^T V) / (q'_i . sum_j k'_j)."""
    import torch

    qf, kf = reference_kernel(q, projection, True), reference_kernel(k, projection, False)
    out = torch.empty_like(v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = (qf[b, h] @ (kf[b, h].T @ v[b, h])) / (qf[b, h] @ kf[b, h].sum(0))[:, None]
    return out


def reference_forward(state: dict, tokens, positions, heads: int, mask=None):
    """``PerformerLM.forward(return_encodings=True)`` from the raw state dict: one call is one
    official batch (so the key maximum spans all its cells). ``mask`` zeroes v only (cellLM)."""
    import torch.nn.functional as F

    s = {k: v.double() for k, v in state.items()}
    dim = s["token_emb.weight"].shape[1]
    x = s["token_emb.weight"][tokens] + s["pos_emb.emb.weight"][positions]
    depth = 1 + max(int(k.split(".")[3]) for k in s if k.startswith("performer.net.layers."))
    b, n = tokens.shape
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        a = F.layer_norm(x, (dim,), s[p + "0.norm.weight"], s[p + "0.norm.bias"])
        q, k, v = ((a @ s[p + f"0.fn.to_{w}.weight"].T).reshape(b, n, heads, -1).transpose(1, 2) for w in "qkv")
        if mask is not None:
            v = v * mask[:, None, :, None]
        out = reference_attention(q, k, v, s[p + "0.fn.fast_attention.projection_matrix"])
        x = x + out.transpose(1, 2).reshape(b, n, -1) @ s[p + "0.fn.to_out.weight"].T + s[p + "0.fn.to_out.bias"]
        f = F.layer_norm(x, (dim,), s[p + "1.norm.weight"], s[p + "1.norm.bias"])
        f = F.gelu(f @ s[p + "1.fn.fn.w1.weight"].T + s[p + "1.fn.fn.w1.bias"])
        x = x + f @ s[p + "1.fn.fn.w2.weight"].T + s[p + "1.fn.fn.w2.bias"]
    return F.layer_norm(x, (dim,), s["norm.weight"], s["norm.bias"])


# The official forward's kernel (performer_pytorch.softmax_kernel as vendored by scBERT and by
# OpenBioMed's cellLM), restated for the parity tests of both.
def favor(t, projection, query: bool):
    """softmax_kernel: positive random features of t (b, h, n, d) with the stored projection (m, d)."""
    import torch

    scale = t.shape[-1] ** -0.25
    dash = torch.matmul(scale * t, projection.T)
    half_sq = (t * t).sum(-1, keepdim=True) * scale ** 2 / 2
    top = dash.max(-1, keepdim=True).values if query else dash.max()   # keys: one maximum over the tensor
    return (torch.exp(dash - half_sq - top) + 1e-4) / projection.shape[0] ** 0.5


def scbert_gene_fill(X, var_names, genes: list) -> np.ndarray:
    """scBERT's preprocess.py gene filling: one float32 column per gene of ``genes``, the counts of
    the first source column of that name (``obj.index(ref[i])``), zeros for genes not in the source."""
    import scipy.sparse as sp

    first = {}
    for c, name in enumerate(var_names):
        first.setdefault(str(name), c)
    dense = np.asarray(X.todense() if sp.issparse(X) else X)
    counts = np.zeros((dense.shape[0], len(genes)), dtype=np.float32)
    for i, gene in enumerate(genes):
        if gene in first:
            counts[:, i] = dense[:, first[gene]]
    return counts
