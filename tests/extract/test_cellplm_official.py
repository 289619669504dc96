"""CellPLM against an independent re-statement of the official embedding path.

The re-statement below was written from the official code (github.com/OmicsML/CellPLM at commit
b59ee76), re-expressed with anndata, sklearn and plain torch ops on the raw state dict; it uses
none of scdrugmap's modules. It follows ``pipeline/cell_embedding.py::CellEmbeddingPipeline.predict``
in the official order:

1. ``pipeline/__init__.py::Pipeline.common_preprocess``: when no var name is in the model's gene
   set, the symbols are converted to Ensembl IDs (``pipeline/experimental.py::symbol_to_ensembl``,
   unmapped ones become ``'0'``) and ``var_names_make_unique`` is called; then the genes in the
   gene set are kept, in the dataset's order;
2. ``utils/data.py::TranscriptomicDataset(order_required=True)``: one item per value of
   ``obs['batch']`` (sklearn's ``LabelEncoder``), or one item of every cell without the column;
   an item's counts as float, then a float32 sparse tensor; its cells' positions;
3. ``CellEmbeddingPipeline._inference``: each item cut into consecutive slices of ``batch_size``
   cells, the last the remainder, one forward pass per slice; predictions put back in the
   dataset's order (the ``scatter_`` of the order list);
4. ``model/cellformer.py::OmicsFormer.forward`` with ``head_type='embedder'`` in ``eval()``:
   ``embedder/omics.py``: log1p of the counts, times the embedding rows of the input genes
   (``OmicsEmbedder``), ``extra_linear`` (Linear, ReLU, Dropout, GroupNorm with 4 groups), plus
   the positional encoding, 0 for non-spatial cells (``pe = 0.``); ``encoder/transformer.py``:
   ``layer/flowformer.py::FlowformerLayer`` (pre-norm, LayerNorm, ``Flow_Attention`` over the
   cells of the slice, FF = Linear, GELU, Linear); ``latent/__init__.py::PreLatentNorm``
   (LayerNorm); ``latent/autoencoders.py::GMVAELatentLayer`` in eval: ``InferenceNet`` with
   ``hard=True``, the cluster ``y`` from ``GumbelSoftmax.gumbel_softmax``, then
   ``inference_qzyx`` (Linear, ReLU, ``Gaussian.mu``); the embedding is ``mean``
   (``head/downstream.py::EmbedderHead``).

**The Gumbel draw.** The official GMVAE adds Gumbel noise to the cluster logits even in eval;
scdrugmap takes the most likely cluster (a documented difference). The re-statement runs the
official straight-through hard Gumbel-softmax with the noise given: both sides get the same
draw, a noise of zero, which is the argmax.

**Gene symbols.** The official conversion asks the mygene web service. Offline, both sides use
the same symbol -> Ensembl file (Geneformer's ``gene_name_id_dict.pkl``) with scdrugmap's
documented lookup: the symbol as written, then ignoring case.

The checkpoint: random weights in the official key layout with the real config and 19,374-gene
list, small sizes (``official_cellplm.py``). Cells: 40 real PC9 cells, with an obs ``batch``
column whose values alternate, so the official items interleave in store order.
"""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pytest

from checkpoints import centred_cosines, write_pc9_small
from conftest import SHARED
from official_cellplm import RELEASE, save_cellplm

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.store.store import Store  # noqa: E402

GENE_MAP = SHARED / "backbone_assets" / "geneformer" / "gene_name_id_dict.pkl"
FLOW_EPS = 1e-6                        # Flow_Attention(eps=1e-6)
LN_EPS = GN_EPS = 1e-5                 # nn.LayerNorm, nn.GroupNorm defaults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_cellplm(tmp_path_factory.mktemp("cellplm") / "ckpt")


@pytest.fixture(scope="module")
def pc9_batches(tmp_path_factory):
    """40 real PC9 cells with obs['batch'] = sample id + the row's parity: four interleaved values."""
    if not GENE_MAP.exists():
        pytest.skip("gene_name_id_dict.pkl not found: the shared test data is expected at ../shared")
    path = write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=20)
    a = ad.read_h5ad(path)
    a.obs["batch"] = [f"{s}_{i % 2}" for i, s in enumerate(a.obs["sample_id"].astype(str))]
    assert a.obs["batch"].nunique() == 4
    a.write_h5ad(path)
    return path


# ---- the official path, re-stated ----------------------------------------------------------------
def symbols_to_ensembl(symbols):
    """Offline stand-in for symbol_to_ensembl: the gene map, exact then ignoring case; '0' if unknown."""
    with open(GENE_MAP, "rb") as f:
        exact = pickle.load(f)
    folded = {}
    for symbol, ensembl in exact.items():
        folded.setdefault(symbol.upper(), ensembl)
    return [exact.get(s) or folded.get(s.upper()) or "0" for s in symbols]


def common_preprocess(adata, gene_set):
    adata = adata.copy()
    if not adata.var.index.isin(gene_set).any():
        adata.var.index = symbols_to_ensembl(adata.var.index.tolist())
        adata.var_names_make_unique()
    return adata[:, [g for g in adata.var.index.tolist() if g in gene_set]]


def transcriptomic_items(adata):
    """TranscriptomicDataset: (float32 counts of the item's cells, their positions) per batch value."""
    from sklearn.preprocessing import LabelEncoder

    if "batch" in adata.obs:
        labels = LabelEncoder().fit(adata.obs["batch"]).transform(adata.obs["batch"])
    else:
        labels = np.zeros(adata.shape[0], dtype=np.int8)
    items = []
    for b in range(labels.max() + 1):
        x = adata[labels == b].X
        x = torch.tensor(np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=float)).float()
        items.append((x, torch.from_numpy((labels == b).nonzero()[0])))
    return items


def layer_norm(h, s, name):
    return F.layer_norm(h, h.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps=LN_EPS)


def linear(h, s, name):
    return h @ s[name + ".weight"].T + s[name + ".bias"]


def flow_attention(x, s, p, heads):
    """Flow_Attention.forward for one sequence (the slice's cells), head by head, in its linear-time
    order: the flows, their conservation, competition over keys, allocation over queries."""
    n, d = x.shape
    q = torch.sigmoid(linear(x, s, p + "query_projection"))
    k = torch.sigmoid(linear(x, s, p + "key_projection"))
    v = linear(x, s, p + "value_projection")
    outs = []
    for c in range(0, d, d // heads):
        qh, kh, vh = (t[:, c:c + d // heads] for t in (q, k, v))
        sink_in = 1.0 / ((qh + FLOW_EPS) @ (kh.sum(0) + FLOW_EPS))
        source_out = 1.0 / ((kh + FLOW_EPS) @ (qh.sum(0) + FLOW_EPS))
        conserved_sink = (qh + FLOW_EPS) @ ((kh * source_out[:, None]).sum(0) + FLOW_EPS)
        conserved_source = ((kh + FLOW_EPS) @ ((qh * sink_in[:, None]).sum(0) + FLOW_EPS)).clamp(-1.0, 1.0)
        allocation = torch.sigmoid(conserved_sink * (n / n))               # queries / keys: the same cells
        competition = torch.softmax(conserved_source, dim=0) * n
        kv = kh.T @ (vh * competition[:, None])                            # (dh, dh)
        outs.append(((qh * sink_in[:, None]) @ kv) * allocation[:, None])
    return linear(torch.cat(outs, dim=1), s, p + "out_projection")


def hard_gumbel_softmax(logits, noise, temperature=1.0):
    """GumbelSoftmax.gumbel_softmax(hard=True) with the Gumbel noise given."""
    y = torch.softmax((logits + noise) / temperature, dim=-1)
    y_hard = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
    return (y_hard - y) + y                                                # straight-through value


def gumbel_noise(shape, generator, eps=1e-20):
    """GumbelSoftmax.sample_gumbel, from ``generator``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return -torch.log(-torch.log(u + eps) + eps)


def official_forward(s, cfg, x_seq, gene_list, gene_index, generator=None):
    """OmicsFormer.forward (head_type='embedder', eval) for one slice, float64, from the raw state
    dict. The Gumbel noise: zero (scdrugmap's draw, the argmax) or drawn from ``generator``."""
    heads = cfg.get("enc_head", 8)
    gene_idx = torch.tensor([gene_index[g] for g in gene_list if g in gene_index])
    h = torch.log1p(x_seq.double()) @ s["embedder.feat_enc.emb"][gene_idx]
    h = F.relu(linear(h, s, "embedder.extra_linear.0"))
    h = F.group_norm(h, 4, s["embedder.extra_linear.3.weight"], s["embedder.extra_linear.3.bias"], eps=GN_EPS)
    h = h + 0.0                                                            # pe = 0. (cat_pe false)
    for i in range(cfg["enc_layers"]):
        p = f"encoder.layers.{i}."
        h = h + flow_attention(layer_norm(h, s, p + "norm1"), s, p + "self_attn.", heads)
        f = F.gelu(linear(layer_norm(h, s, p + "norm2"), s, p + "_ff_block.0"))
        h = h + linear(f, s, p + "_ff_block.3")
    h = layer_norm(h, s, "pre_latent_norm.norm")
    p = "latent.layers.1.inference."
    logits = linear(h, s, p + "inference_qyx.0.logits")
    noise = torch.zeros_like(logits) if generator is None else gumbel_noise(logits.shape, generator)
    y = hard_gumbel_softmax(logits, noise)
    hidden = F.relu(linear(torch.cat([h, y], dim=1), s, p + "inference_qzyx.0"))
    return linear(hidden, s, p + "inference_qzyx.2.mu")                  # 'mean'


def official_predict(h5ad, folder, batch_size, use_batch=True, generator=None):
    """CellEmbeddingPipeline.predict(adata, {'batch_size': batch_size}): (embeddings, slices as
    positions in the dataset, genes kept); Gumbel noise from ``generator`` (None: zero)."""
    import json

    cfg = json.loads((folder / f"{RELEASE}.config.json").read_text())
    s = {k: v.double() for k, v in torch.load(folder / f"{RELEASE}.best.ckpt",
                                              weights_only=True)["model_state_dict"].items()}
    gene_index = {g: i for i, g in enumerate(cfg["gene_list"])}
    adata = ad.read_h5ad(h5ad)
    if not use_batch:
        del adata.obs["batch"]
    adata = common_preprocess(adata, set(cfg["gene_list"]))
    gene_list = adata.var.index.tolist()
    if batch_size <= 0:
        batch_size = adata.shape[0]
    preds, orders = [], []
    with torch.no_grad():
        for x, positions in transcriptomic_items(adata):
            for j in range(0, x.shape[0], batch_size):
                cur = torch.arange(j, min(j + batch_size, x.shape[0]))
                preds.append(official_forward(s, cfg, x[cur], gene_list, gene_index, generator))
                orders.append(positions[cur])
    order = torch.cat(orders)
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order))                                 # order.scatter_(0, order, arange)
    return torch.cat(preds)[back].numpy(), [o.tolist() for o in orders], len(gene_list)


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_cells, use_batch, chunk_rows", [(6, True, 16), (15, False, 7), (4096, True, 4096)])
def test_cli_embedding_matches_the_official_path(cli, checkpoint, pc9_batches, tmp_path, batch_cells, use_batch,
                                                 chunk_rows):
    """The official grouping (slices of batch_cells within each obs['batch'] value, or over every
    cell without the column), whatever the store's chunks."""
    import json

    st = tmp_path / "st"
    cli.ok("ingest", pc9_batches, "--store", st, "--dataset", "pc9", "--label-col", "response")
    options = ["--option", f"gene_map={GENE_MAP}", "--option", f"batch_cells={batch_cells}"]
    if not use_batch:
        options += ["--option", "batch_col="]
    cli.ok("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--dtype", "float32",
           "--chunk-rows", str(chunk_rows), "--quiet", *options)
    ours = Store.open(st).load("cellplm")[0]
    ref, groups, n_genes = official_predict(pc9_batches, checkpoint, batch_cells, use_batch)
    params = json.loads(Store.open(st).provenance("cellplm").iloc[0]["params"])
    assert params["genes_matched"] == n_genes > 10_000
    assert params["groups"] == len(groups) and params["batch_col_used"] is use_batch
    if use_batch:
        assert any(np.diff(g).max() > 1 for g in groups)                 # items interleave in store order
    cos = centred_cosines(ours.astype(np.float64), ref)
    print(f"CellPLM batch_cells={batch_cells} batch={use_batch}: {len(groups)} slices, centred cosine "
          f"vs the official re-statement: min {cos.min():.8f}, max |diff| {np.abs(ours - ref).max():.2e}")
    assert ours.shape == ref.shape == (40, 32)
    assert cos.min() >= 0.9999, cos.min()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_the_grouping_and_the_gumbel_draw_matter(checkpoint, pc9_batches):
    """The re-statement is sensitive to what both sides must share: slices of 6 and of 15 cells
    disagree, and an official run's random Gumbel draws move the cells whose drawn cluster is not
    the argmax (the others do not move: the noise only picks the cluster)."""
    six = official_predict(pc9_batches, checkpoint, 6)[0]
    fifteen = official_predict(pc9_batches, checkpoint, 15)[0]
    assert centred_cosines(six, fifteen).min() < 0.999
    drawn = official_predict(pc9_batches, checkpoint, 6, generator=torch.Generator().manual_seed(0))[0]
    change = np.abs(drawn - six).max(1)
    moved = change > 1e-3
    print(f"CellPLM: a random Gumbel draw moves {moved.sum()} of {len(moved)} cells")
    assert 0 < moved.sum() < len(moved) and change[~moved].max() < 1e-9


def test_official_preprocess_fails_on_repeated_ensembl_ids():
    """Why scdrugmap's handling of a repeated Ensembl ID (each column adds its term) is its own:
    the official selection by a list of names has no result there."""
    import pandas as pd

    def anndata(genes):
        return ad.AnnData(np.ones((3, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))

    genes = ["ENSG00000146648", "ENSG00000141510", "ENSG00000146648"]
    with pytest.warns(UserWarning, match="not unique"), pytest.raises(pd.errors.InvalidIndexError):
        common_preprocess(anndata(genes), set(genes))
    assert common_preprocess(anndata(genes[:2]), set(genes)).shape == (3, 2)   # unique IDs: all kept
