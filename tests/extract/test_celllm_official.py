"""cellLM against an independent re-statement of the official path, on real PC9 cells.

The re-statement below is written from the official code (github.com/PharMolix/OpenBioMed at
ce3ccab), read and re-expressed with numpy and plain torch ops on the raw state-dict tensors; it
uses nothing of scdrugmap's cellLM or Performer modules. It follows, in the official order:

* the values: OpenBioMed reads an ``.h5ad`` as it is (``datasets/ctc_dataset.py``, then
  ``feature/cell_featurizer.py::CellFullseqFeaturizer``: the row's ``toarray()[0]`` as a tensor)
  and publishes neither its normalisation nor its 19,379-gene order. What is re-stated here is
  the preparation scdrugmap infers, scBERT's ``preprocess.py`` over the model's gene list: each
  listed gene filled from the first dataset column with exactly that symbol (absent genes 0),
  ``normalize_total(target_sum=1e4)`` and ``log1p(base=2)`` as scanpy 1.7.2 computes them in
  float32 (no cell filter: OpenBioMed filters no cell);
* ``configs/ctc/cellLM.json`` (``network.structure``) and ``models/task_model/ctc_model.py``: the
  encoder ``PerformerLM_CellLM(**structure)`` loads ``torch.load(ckpt)[param_key]`` strictly and
  runs with ``return_encodings=True``, in ``eval()`` (no projection redraw, no dropout);
* ``models/cell/performer_celllm.py::PerformerLM_CellLM.forward`` on a batch of one cell: the
  entries ``> 0`` in gene-list order, clipped at ``cls_token_id - 1`` and ``.long()``, after the
  CLS token (``num_tokens - 2``, gene row ``gene_num``); cut to ``max_seq_len``; padded to
  ``max_seq_len`` with the PAD token (``num_tokens - 1``, gene row ``gene_num + 1``) and a mask
  true on the real positions; ``token_emb`` plus the float64 ``pos_emb`` rows at the gene
  positions added in place; the ``Performer`` with ``mask``, which ``SelfAttention`` applies to
  v only (``v.masked_fill_(~mask, 0)``: the padded keys stay in the sums and in the key
  maximum); per layer ``x + attn(LN(x))``, ``x + FeedForward(LN(x))`` (exact GELU); the final
  ``norm``; ``x *= mask``. The attention is ``softmax_kernel`` with the stored projection (the
  maximum per query row, one maximum over the whole key tensor, eps 1e-4) and the non-causal
  ``linear_attention``, as in scBERT's copy of the same code.

The sizes are the config's and the checkpoint's tensors' (``dim_head`` and ``nb_features`` from
the projection matrix; the test config is small), and the positional table is the checkpoint's
``pos_emb``, which the official ``load_state_dict`` puts over the one built from the gene2vec file:
the release's files win over the code's defaults.

OpenBioMed defines no cell embedding from the encoder; the pooling re-stated is scdrugmap's, the
encoding at the CLS position (position 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from checkpoints import centred_cosines, cli_embeddings, write_pc9_every
from official_performer import CELLLM_CFG, favor, pc9_gene_order, save_celllm, scbert_gene_fill

torch = pytest.importorskip("torch")


F = torch.nn.functional


# -- the official path, re-stated ----------------------------------------------------------
def prepared_values(X, var_names, genes: list) -> np.ndarray:
    """scBERT's preprocess.py over the model's genes (filter_cells left out), float32."""
    counts = scbert_gene_fill(X, var_names, genes)
    totals = counts.sum(1, dtype=np.float32)
    totals = (totals + (totals == 0)) / np.float32(1e4)
    counts = counts * (np.float32(1) / totals)[:, None]
    return (np.log1p(counts) / np.log(2)).astype(np.float32)


def celllm_inputs(batch, structure: dict):
    """The tokenisation at the top of PerformerLM_CellLM.forward: (tokens, gene rows, mask)."""
    num_tokens, gene_num, max_len = structure["num_tokens"], structure["gene_num"], structure["max_seq_len"]
    pad_token, cls_token = num_tokens - 1, num_tokens - 2
    tokens = torch.full((len(batch), max_len), pad_token, dtype=torch.long)
    rows = torch.full((len(batch), max_len), gene_num + 1, dtype=torch.long)
    mask = torch.zeros(len(batch), max_len, dtype=torch.bool)
    for i, cell in enumerate(batch):
        nonzero = cell > 0
        values = cell[nonzero]
        values[values > cls_token - 1] = cls_token - 1
        seq = torch.cat([torch.tensor([cls_token]), values.long()])
        at = torch.cat([torch.tensor([gene_num]), torch.arange(len(cell))[nonzero]])
        n = min(len(seq), max_len)
        tokens[i, :n], rows[i, :n], mask[i, :n] = seq[:n], at[:n], True
    return tokens, rows, mask


def celllm_encodings(w: dict, tokens, rows, mask):
    """The rest of PerformerLM_CellLM.forward(return_encodings=True) from the raw state dict."""
    dim = w["token_emb.weight"].shape[1]
    x = (w["token_emb.weight"][tokens].double() + w["pos_emb.emb.weight"][rows]).float()   # x += pos_emb(x, pos)
    depth = len({k.split(".")[3] for k in w if k.startswith("performer.net.layers.")})
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        projection = w[p + "0.fn.fast_attention.projection_matrix"]
        a = F.layer_norm(x, (dim,), w[p + "0.norm.weight"], w[p + "0.norm.bias"])
        q, k, v = (torch.matmul(a, w[p + f"0.fn.to_{s}.weight"].T).unflatten(-1, (-1, projection.shape[1]))
                   .transpose(1, 2) for s in "qkv")                                        # b h n d
        v = torch.where(mask[:, None, :, None], v, torch.zeros_like(v))                     # only v is masked
        qf, kf = favor(q, projection, True), favor(k, projection, False)
        out = torch.matmul(qf, torch.matmul(kf.transpose(-1, -2), v)) / torch.matmul(qf, kf.sum(-2)[..., None])
        x = x + torch.matmul(out.transpose(1, 2).flatten(-2), w[p + "0.fn.to_out.weight"].T) + w[p + "0.fn.to_out.bias"]
        f = F.layer_norm(x, (dim,), w[p + "1.norm.weight"], w[p + "1.norm.bias"])
        f = F.gelu(torch.matmul(f, w[p + "1.fn.fn.w1.weight"].T) + w[p + "1.fn.fn.w1.bias"])
        x = x + torch.matmul(f, w[p + "1.fn.fn.w2.weight"].T) + w[p + "1.fn.fn.w2.bias"]
    return F.layer_norm(x, (dim,), w["norm.weight"], w["norm.bias"]) * mask[..., None]


def official_embed(model_dir: Path, X, var_names):
    """Per cell, alone in its batch: (CLS encodings, the number of real positions of each cell)."""
    structure = json.loads((model_dir / CELLLM_CFG).read_text())["network"]["structure"]
    genes = [line.strip() for line in (model_dir / "gene_list.txt").read_text().splitlines() if line.strip()]
    assert len(genes) == structure["gene_num"]
    ckpt = torch.load(model_dir / Path(structure["ckpt_path"]).name, map_location="cpu", weights_only=True)
    state = ckpt[structure["param_key"]] if structure["param_key"] else ckpt
    values = prepared_values(X, var_names, genes)
    out, lengths = [], []
    with torch.no_grad():
        for row in values:
            cell = torch.from_numpy(row)[None]                       # CellFullseqFeaturizer, batch of one
            tokens, rows, mask = celllm_inputs(cell, structure)
            out.append(celllm_encodings(state, tokens, rows, mask)[:, 0])
            lengths.append(int(mask.sum()))
    return torch.cat(out).numpy(), np.array(lengths)


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pc9_cells(tmp_path_factory):
    """Every 48th PC9 cell from the 11th: 32 cells of both classes."""
    return write_pc9_every(tmp_path_factory.mktemp("data"))


# the real config (cellLM_ctc.json) with small sizes: 370 genes in 128 positions (25 to 195 nonzero
# genes: 22 of the 32 cells cut, 9 padded), and 2,020 genes in 640 positions (89 to 1,540: 13 cut, 19 padded)
CASES = {"370_genes_128": (dict(), 128), "2020_genes_640": (dict(n_detected=1500, n_random=500, n_absent=20), 640)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_embeddings_equal_the_official_path(cli, pc9_cells, tmp_path, case):
    order, max_seq_len = CASES[case]
    release = save_celllm(tmp_path / "release", pc9_gene_order(**order), max_seq_len=max_seq_len)
    path, cells = pc9_cells
    ours, frame = cli_embeddings(cli, path, tmp_path / "st", "celllm", release, "--batch-size", "4")
    assert frame["row"].tolist() == list(range(cells.n_obs)) and np.isfinite(ours).all()
    theirs, lengths = official_embed(release, cells.X, cells.var_names)
    assert ours.shape == theirs.shape == (cells.n_obs, 32)
    assert (lengths == max_seq_len).sum() >= 10 and (lengths < max_seq_len).sum() >= 9   # cells cut, cells padded
    cosines = centred_cosines(ours, theirs)
    assert cosines.min() >= 0.9999, cosines.round(6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
