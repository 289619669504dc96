"""scBERT against an independent re-statement of the official path, on real PC9 cells.

The re-statement below is written from the official code (github.com/TencentAILabHealthcare/scBERT
at 262fd4b), read and re-expressed with numpy and plain torch ops on the raw state-dict tensors; it
uses nothing of scdrugmap's scBERT or Performer modules. It follows, in the official order:

* ``preprocess.py``: a float32 matrix cells x the ``var_names`` of ``panglao_10000.h5ad``, each
  reference gene filled from the dataset column ``obj.index(gene)`` (the first column with exactly
  that symbol; absent genes stay 0); then ``sc.pp.filter_cells(min_genes=200)``,
  ``sc.pp.normalize_total(target_sum=1e4)`` and ``sc.pp.log1p(base=2)`` as scanpy 1.7.2 (the
  official requirements) computes them on float32: totals, ``counts += counts == 0``,
  ``counts / 1e4``, rows scaled by ``1 / counts``; ``log1p(x)``, divided by ``log(2)``;
* ``predict.py``, one cell per batch: the row, ``x[x > CLASS - 2] = CLASS - 2`` (CLASS =
  ``bin_num + 2`` = ``num_tokens``), ``.long()``, a token ``0`` appended, ``unsqueeze(0)``, and the
  model in ``eval()`` (``Performer.check_redraw_projections`` returns at once: the stored
  projection matrices are used, nothing is drawn);
* ``performer_pytorch/performer_pytorch.py``: ``PerformerLM.forward(return_encodings=True)``:
  ``token_emb`` plus ``Gene2VecPositionalEmbedding`` rows ``arange(n)`` (a float64 table added in
  place to float32), then per layer (``reversible.py::SequentialSequence``) ``x + attn(LN(x))``
  and ``x + FeedForward(LN(x))`` (exact GELU), the final ``norm``. ``SelfAttention``: q, k, v
  without bias, heads split, ``FastAttention`` with ``softmax_kernel`` (``d^-1/4`` scaling, the
  stored projection, ``exp(dash - |x|^2 d^-1/2 / 2 - max) + 1e-4`` times ``m^-1/2``; the maximum
  per query row, and one maximum over the whole key tensor) and the non-causal
  ``linear_attention``, then ``to_out``.

The sizes (dim, depth, heads, dim_head, nb_features, bins) are read from the checkpoint's tensors,
not from ``predict.py``'s hard-coded ``PerformerLM(num_tokens=7, dim=200, depth=6, heads=10)``:
where the release's files and the official code disagree, the files win (the test checkpoint is
small). Its ``pos_emb.emb.weight`` is the table used: the official ``load_state_dict`` overwrites
the one built from ``gene2vec_16906.npy``.

scBERT defines no cell embedding (``predict.py`` runs its classifier head); the pooling re-stated
is scdrugmap's: the mean of the encodings over the gene positions, the appended token left out.
The official ``filter_cells(min_genes=200)`` drops cells, scdrugmap embeds every cell: the cells the
official filter keeps are compared, and the dropped ones are checked to be embedded all the same.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from checkpoints import centred_cosines, cli_embeddings, write_pc9_every
from official_performer import SCBERT_CKPT, SCBERT_GENES, favor, pc9_gene_order, save_scbert, scbert_gene_fill

torch = pytest.importorskip("torch")


F = torch.nn.functional


# -- the official path, re-stated ----------------------------------------------------------
def official_preprocess(X, var_names, reference: list):
    """preprocess.py: (log2-normalised float32 matrix of the kept cells, kept-cell mask)."""
    counts = scbert_gene_fill(X, var_names, reference)          # obj.index(ref[i]): the first column
    kept = (counts > 0).sum(1) >= 200                             # filter_cells(min_genes=200)
    counts = counts[kept]
    totals = counts.sum(1, dtype=np.float32)                      # normalize_total(target_sum=1e4)
    totals = totals + (totals == 0)
    totals = totals / np.float32(1e4)
    counts = counts * (np.float32(1) / totals)[:, None]
    counts = np.log1p(counts) / np.log(2)                         # log1p(base=2)
    return counts.astype(np.float32), kept


def predict_input(row: np.ndarray, num_tokens: int):
    """predict.py: clip at CLASS - 2, .long(), append the token 0, a batch of one."""
    seq = row.copy()
    seq[seq > num_tokens - 2] = num_tokens - 2
    seq = torch.from_numpy(seq).long()
    return torch.cat([seq, torch.zeros(1, dtype=torch.long)])[None]


def performer_encodings(state: dict, tokens):
    """PerformerLM.forward(tokens, return_encodings=True) in eval mode, from the raw state dict."""
    w = state
    dim = w["token_emb.weight"].shape[1]
    n = tokens.shape[1]
    x = (w["token_emb.weight"][tokens].double() + w["pos_emb.emb.weight"][:n]).float()   # x += pos_emb(x)
    depth = len({k.split(".")[3] for k in w if k.startswith("performer.net.layers.")})
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        projection = w[p + "0.fn.fast_attention.projection_matrix"]
        dim_head = projection.shape[1]
        a = F.layer_norm(x, (dim,), w[p + "0.norm.weight"], w[p + "0.norm.bias"])
        q, k, v = (torch.matmul(a, w[p + f"0.fn.to_{s}.weight"].T) for s in "qkv")
        q, k, v = (t.unflatten(-1, (-1, dim_head)).transpose(1, 2) for t in (q, k, v))   # b h n d
        qf, kf = favor(q, projection, True), favor(k, projection, False)
        context = torch.matmul(kf.transpose(-1, -2), v)                                     # b h m d
        out = torch.matmul(qf, context) / torch.matmul(qf, kf.sum(-2)[..., None])          # linear_attention
        out = out.transpose(1, 2).flatten(-2)
        x = x + torch.matmul(out, w[p + "0.fn.to_out.weight"].T) + w[p + "0.fn.to_out.bias"]
        f = F.layer_norm(x, (dim,), w[p + "1.norm.weight"], w[p + "1.norm.bias"])
        f = F.gelu(torch.matmul(f, w[p + "1.fn.fn.w1.weight"].T) + w[p + "1.fn.fn.w1.bias"])
        x = x + torch.matmul(f, w[p + "1.fn.fn.w2.weight"].T) + w[p + "1.fn.fn.w2.bias"]
    return F.layer_norm(x, (dim,), w["norm.weight"], w["norm.bias"])


def official_embed(model_dir, X, var_names):
    """The official path for every cell filter_cells keeps: (embeddings, kept mask, token rows)."""
    reference = ad.read_h5ad(model_dir / SCBERT_GENES).var_names.tolist()   # panglao.var_names.tolist()
    state = torch.load(model_dir / SCBERT_CKPT, map_location="cpu", weights_only=True)["model_state_dict"]
    num_tokens = state["token_emb.weight"].shape[0]
    data, kept = official_preprocess(X, var_names, reference)
    out, tokens = [], []
    with torch.no_grad():
        for row in data:                                                      # one cell per batch
            seq = predict_input(row, num_tokens)
            tokens.append(seq[0].numpy())
            h = performer_encodings(state, seq)
            out.append(h[:, :len(reference)].mean(1))                         # the appended token left out
    return torch.cat(out).numpy(), kept, np.array(tokens)


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Random weights in the release layout (dim 16, 2 layers, 2 heads) over a 2,020-gene reference
    order (1,500 most detected PC9 genes, 500 others, 20 absent), with panglao_10000.h5ad."""
    return save_scbert(tmp_path_factory.mktemp("scbert") / "release",
                       pc9_gene_order(n_detected=1500, n_random=500, n_absent=20))


@pytest.fixture(scope="module")
def pc9_cells(tmp_path_factory):
    """Every 48th PC9 cell from the 11th: 32 cells of both classes, 113 to 1,360 reference genes
    expressed (two below the official filter's 200)."""
    return write_pc9_every(tmp_path_factory.mktemp("data"))


def test_cli_embeddings_equal_the_official_path(cli, release, pc9_cells, tmp_path):
    path, cells = pc9_cells
    ours, frame = cli_embeddings(cli, path, tmp_path / "st", "scbert", release, "--batch-size", "4")
    assert frame["row"].tolist() == list(range(cells.n_obs)) and np.isfinite(ours).all()
    theirs, kept, tokens = official_embed(release, cells.X, cells.var_names)
    # the official filter drops two cells (113 and 175 genes); scdrugmap embeds them too
    assert (~kept).sum() == 2 and len(ours) == len(kept)
    assert np.unique(tokens).tolist() == [0, 1, 2, 3, 4, 5]                 # every bin occurs, cap included
    ours = ours[kept]
    assert ours.shape == theirs.shape == (kept.sum(), 16)
    cosines = centred_cosines(ours, theirs)
    assert cosines.min() >= 0.9999, cosines.round(6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
