"""scFoundation against an independent re-statement of the official cell embedding, on real PC9 cells.

The re-statement below is written from the official code (github.com/biomap-research/scFoundation,
folder ``model/``), read and re-expressed with pandas, numpy and plain torch ops on the raw
state-dict tensors; it uses nothing of scdrugmap's scFoundation module. It follows, in the
official order:

* ``model/README.md`` step 1 and ``get_embedding.py::main_gene_selection``: the cells as a
  DataFrame with the source gene symbols as columns, the gene list's genes that are missing added
  as zero columns, then the columns taken in the order of ``OS_scRNA_gene_index.19264.tsv``
  (exact symbols; other genes dropped);
* ``get_embedding.py::main`` with ``--input_type singlecell --output_type cell --version ce
  --pre_normalized F``, one cell at a time: ``log1p(x / x.sum() * 1e4)`` in float64, turned into a
  float32 tensor from the Python list with T (``--tgthighres``: ``tN`` -> N, ``fN`` ->
  log10(total * N), ``aN`` -> log10(total) + N) and S = log10(total) appended; positions
  ``arange(19266)``; ``value_labels = x > 0``;
* ``load.py::gatherData`` (the values and positions with a true label, in position order, padded
  with ``pad_token_id``; the padding mask is ``value == pad_token_id``) and
  ``load_model_frommmf``/``convertconfig`` (entry ``cell``; the config is
  ``model_config[model]`` updated with ``dataset_config.rnaseq``; keys lose ``model.``);
* ``pretrainmodels/mae_autobin.py``: ``AutoDiscretizationEmbedding2`` (``mlp``, LeakyReLU 0.1,
  ``bin_alpha * h + mlp2(h)``, softmax, times ``emb``; values equal to ``mask_token_id`` /
  ``pad_token_id`` take ``emb_mask`` / ``emb_pad``) plus ``pos_emb`` at the positions;
  ``pretrainmodels/transformer.py``: ``nn.TransformerEncoderLayer(dim, heads, 4 * dim,
  batch_first=True)`` (post-norm, ReLU, eval) with the key padding mask, then ``norm``;
* the pooling of ``get_embedding.py``: ``all`` = [last token, second-to-last, max and mean over the
  tokens before them]; ``max`` = max over all tokens.

The official path draws no random numbers, so nothing needs to be shared between the two sides.
The official script aligns the genes itself only when the input has fewer than 19,264 columns
(PC9 has 25,077: the README's step 1 aligns them beforehand, which the re-statement does always).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from checkpoints import PC9, _missing, centred_cosines
from official_scfoundation import GENE_INDEX, save_scfoundation

torch = pytest.importorskip("torch")

from scdrugmap.store.store import Store  # noqa: E402

HIDDEN = 64


# -- the official path, re-stated ----------------------------------------------------------
def official_gene_selection(X_df: pd.DataFrame, gene_list: list) -> pd.DataFrame:
    """main_gene_selection: zero columns for the missing genes, then the gene list's order."""
    to_fill = list(set(gene_list) - set(X_df.columns))
    filled = pd.DataFrame(np.concatenate([X_df.values, np.zeros((len(X_df), len(to_fill)))], axis=1),
                          index=X_df.index, columns=list(X_df.columns) + to_fill)
    return filled[gene_list]


def official_model(ckpt_path, key: str = "cell"):
    """load_model_frommmf / convertconfig: (flat config, state dict without the 'model.' prefix)."""
    entry = torch.load(ckpt_path, map_location="cpu", weights_only=True)[key]
    config = dict(entry["config"]["model_config"][entry["config"]["model"]])
    config.update(entry["config"]["dataset_config"]["rnaseq"])
    state = {str(k).split("model.")[1]: v for k, v in entry["state_dict"].items()}
    return config, state


def gather(data, labels, pad_id):
    """gatherData: each row's entries with a true label, in position order, right-padded with pad_id."""
    n = int(labels.sum(1).max())
    out = torch.full((len(data), n), pad_id, dtype=data.dtype)
    for r in range(len(data)):
        picked = data[r][labels[r]]
        out[r, :len(picked)] = picked
    return out, out == pad_id


def official_encoder_output(config: dict, state: dict, x, x_padding, positions):
    """token_emb + pos_emb, then pytorchTransformerModule (post-norm layers, final norm)."""
    F = torch.nn.functional
    d, heads = config["encoder"]["hidden_dim"], config["encoder"]["heads"]

    def linear(h, name):
        return h @ state[name + ".weight"].T + state[name + ".bias"]

    def norm(h, name):
        return F.layer_norm(h, (d,), state[name + ".weight"], state[name + ".bias"], eps=1e-5)

    v = x.unsqueeze(2).float()                                            # [B, N, 1]
    h = F.leaky_relu(linear(v, "token_emb.mlp"), 0.1)
    weight = torch.softmax(config["bin_alpha"] * h + linear(h, "token_emb.mlp2"), dim=-1)
    h = weight @ state["token_emb.emb.weight"]
    h[v[..., 0] == config["mask_token_id"]] = state["token_emb.emb_mask.weight"][0]
    h[v[..., 0] == config["pad_token_id"]] = state["token_emb.emb_pad.weight"][0]
    h = h + state["pos_emb.weight"][positions]
    b, n, _ = h.shape
    for i in range(config["encoder"]["depth"]):
        p = f"encoder.transformer_encoder.{i}."
        qkv = (h @ state[p + "self_attn.in_proj_weight"].T + state[p + "self_attn.in_proj_bias"])
        q, k, val = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
        scores = (q / (d // heads) ** 0.5) @ k.transpose(-1, -2)
        if x_padding.any():                                               # keys at value == pad id
            scores = scores.masked_fill(x_padding[:, None, None, :], float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ val).transpose(1, 2).reshape(b, n, d)
        h = norm(h + linear(attended, p + "self_attn.out_proj"), p + "norm1")
        h = norm(h + linear(torch.relu(linear(h, p + "linear1")), p + "linear2"), p + "norm2")
    return norm(h, "encoder.norm")


def official_embed(model_dir, X, symbols, tgthighres: str = "t4", pool_type: str = "all") -> np.ndarray:
    """get_embedding.py --input_type singlecell --output_type cell --version ce --pre_normalized F."""
    gene_list = list(pd.read_csv(model_dir / GENE_INDEX.name, header=0, delimiter="\t")["gene_name"])
    frame = pd.DataFrame(X.toarray() if hasattr(X, "toarray") else X, columns=list(symbols))
    frame = official_gene_selection(frame, gene_list)
    config, state = official_model(model_dir / "models.ckpt")
    out = []
    with torch.no_grad():
        for i in range(len(frame)):
            row = frame.iloc[i, :]
            tmpdata = np.log1p(row / row.sum() * 1e4).tolist()
            total = row.sum()
            kind, number = tgthighres[0], float(tgthighres[1:])
            t = {"f": lambda: np.log10(total * number), "a": lambda: np.log10(total) + number,
                 "t": lambda: number}[kind]()
            x = torch.tensor(tmpdata + [t, np.log10(total)]).unsqueeze(0)
            gene_ids = torch.arange(len(gene_list) + 2).repeat(1, 1)
            labels = x > 0
            x, x_padding = gather(x, labels, config["pad_token_id"])
            positions, _ = gather(gene_ids, labels, config["pad_token_id"])
            h = official_encoder_output(config, state, x, x_padding, positions)
            if pool_type == "all":
                out.append(torch.cat([h[:, -1], h[:, -2], h[:, :-2].max(1).values, h[:, :-2].mean(1)], dim=1))
            else:
                out.append(h.max(1).values)
    return torch.cat(out).numpy()


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Random weights in the release's models.ckpt layout (small encoder) beside the real gene list."""
    return save_scfoundation(tmp_path_factory.mktemp("scf") / "release", seeds={"gene": 1, "cell": 3, "rde": 2})


@pytest.fixture(scope="module")
def pc9_cells(tmp_path_factory):
    """Every 64th PC9 cell from the 49th: 23 cells, 6 sensitive, 376 to 2,485 genes of the gene list
    expressed; and every third of them (8 cells)."""
    if not PC9.exists():
        _missing("PC9 data (data/pc9_erlotinib.h5ad)")
    a = ad.read_h5ad(PC9)
    folder = tmp_path_factory.mktemp("data")
    out = {}
    for name, rows in (("pc9_23", np.arange(48, a.n_obs, 64)), ("pc9_8", np.arange(48, a.n_obs, 192))):
        cells = a[rows].copy()
        cells.write_h5ad(folder / f"{name}.h5ad")
        out[name] = (folder / f"{name}.h5ad", cells.X, np.asarray(cells.var_names.astype(str)))
    return out


@pytest.mark.parametrize("target, pool, cells", [("t4", "all", "pc9_23"), ("a5", "max", "pc9_8")])
def test_cli_embeddings_equal_the_official_path(cli, release, pc9_cells, tmp_path, target, pool, cells):
    """The official defaults (T = 4, pool all) and the README's example T (a5) with pool max."""
    path, X, symbols = pc9_cells[cells]
    st = tmp_path / "st"
    cli.ok("ingest", path, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "scfoundation", "--model-dir", release, "--batch-size", "4",
           "--dtype", "float32", "--quiet", "--option", f"target={target}", "--option", f"pool={pool}")
    ours, _ = Store.open(st).load("scfoundation", dtype=np.float32)
    theirs = official_embed(release, X, symbols, tgthighres=target, pool_type=pool)
    assert ours.shape == theirs.shape == (X.shape[0], HIDDEN * (4 if pool == "all" else 1))
    cosines = centred_cosines(ours, theirs)
    assert cosines.min() >= 0.9999, cosines.round(6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
