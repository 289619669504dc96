"""Geneformer against a minimal re-statement of the official tokenizer and embedding extractor.

The re-statement below is written from the official code (ctheodoris/Geneformer on Hugging Face,
commit ff551ee, 2025-06-27) and imports nothing of scdrugmap's preprocessing:

* ``geneformer/tokenizer.py``: the input the docstring asks for (l. 6-8, 27): raw counts, an
  ``ensembl_id`` per gene (symbols converted by the user; here with the release's
  ``gene_name_id_dict``) and ``n_counts``, the cell's total read count;
  ``TranscriptomeTokenizer.__init__`` (l. 397-414): without a mapping file the mapping is the
  identity over the token dictionary, whose keys are the genes kept; ``sum_ensembl_ids`` (l.
  239-247): nothing to collapse when no two of the data's IDs merge; ``tokenize_anndata`` (l.
  505-548): ``X / n_counts * 10,000 / median`` over the kept genes, made sparse, each cell's
  nonzero values ranked by ``np.argsort(-values)`` (``rank_genes``, l. 64-70);
  ``create_dataset.format_cell_features`` (l. 678-694): V1 keeps the first ``model_input_size``
  tokens; V2 the first ``model_input_size - 2`` between ``<cls>`` and ``<eos>``;
* ``geneformer/emb_extractor.py``: ``EmbExtractor.extract_embs`` (l. 633-645) loads
  ``BertForMaskedLM`` with ``output_hidden_states`` (``perturber_utils.load_model``, l. 111-208),
  sorts cells longest first (``downsample_and_sort``), and takes ``hidden_states[n_layers +
  emb_layer]`` with ``emb_layer=-1`` (``quant_layers``, l. 220-225); ``get_embs`` (l. 93-123) pads
  each batch of ``forward_batch_size`` (100) to its longest cell with ``<pad>``, masks the padding
  (``gen_attention_mask``) and, in ``emb_mode="cell"``, averages the non-padding positions
  (``mean_nonpadding_embs``), after dropping ``<cls>`` and ``<eos>`` when the dictionary has them.

Both sides run the same random checkpoint in the release layout with the release's (V1)
dictionaries on the same real PC9 cells; the embeddings agree to a centred cosine of 0.9999 per
cell (centred on each side by the mean over cells).
"""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import centred_cosines, save_geneformer, write_pc9_small

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scdrugmap.store.store import Store  # noqa: E402

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}


# -- the official tokenizer, re-stated ---------------------------------------------------------
def official_rank_value_encoding(adata: ad.AnnData, folder, input_size: int, special_token: bool) -> list:
    with open(folder / "token_dictionary.pkl", "rb") as f:
        gene_token_dict = pickle.load(f)
    with open(folder / "gene_median_dictionary.pkl", "rb") as f:
        gene_median_dict = pickle.load(f)
    with open(folder / "gene_name_id_dict.pkl", "rb") as f:
        gene_name_id = pickle.load(f)
    # what the official docstring asks of the input file (the user's part)
    var = pd.DataFrame({"ensembl_id": [gene_name_id.get(s) for s in adata.var_names]}, index=adata.var_names)
    counts = sp.csr_matrix(adata.X)
    n_counts = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    # gene_mapping_file=None: the identity over the token dictionary
    mapping = {k: k for k in gene_token_dict}
    in_map = [g for g in var.ensembl_id if g in mapping]
    assert len(set(in_map)) == len({mapping[g] for g in in_map}) and len(in_map) == len(set(in_map))
    collapsed = var.ensembl_id.str.upper().map(mapping)
    genelist = dict.fromkeys(gene_token_dict, True)
    loc = np.where([genelist.get(g, False) for g in collapsed])[0]
    norm_factor = np.array([gene_median_dict[g] for g in collapsed.iloc[loc]])
    tokens = np.array([gene_token_dict[g] for g in collapsed.iloc[loc]])
    x_norm = sp.csr_matrix(counts[:, loc].toarray() / n_counts[:, None] * 10_000 / norm_factor)
    cells = []
    for i in range(x_norm.shape[0]):
        row = x_norm[i]
        ranked = tokens[row.indices][np.argsort(-row.data)]
        if special_token:
            ranked = np.concatenate([[gene_token_dict["<cls>"]], ranked[: input_size - 2],
                                     [gene_token_dict["<eos>"]]])
        else:
            ranked = ranked[:input_size]
        cells.append(ranked)
    return cells, gene_token_dict["<pad>"]


# -- the official embedding extractor, re-stated -----------------------------------------------
def official_cell_embeddings(folder, cells: list, pad_id: int, special_token: bool,
                             forward_batch_size: int = 100) -> np.ndarray:
    model = transformers.BertForMaskedLM.from_pretrained(folder, output_hidden_states=True,
                                                         output_attentions=False).eval()
    layers = 1 + max(int(name.split("layer.")[1].split(".")[0])
                     for name, _ in model.named_parameters() if "layer" in name)
    layer_to_quant = layers + (-1)
    lengths = np.array([len(c) for c in cells])
    order = np.argsort(-lengths, kind="stable")          # datasets' sort("length", reverse=True)
    out = np.empty((len(cells), model.config.hidden_size), dtype=np.float32)
    for lo in range(0, len(cells), forward_batch_size):
        idx = order[lo:lo + forward_batch_size]
        max_len = int(lengths[idx].max())
        ids = torch.stack([torch.nn.functional.pad(torch.as_tensor(cells[i], dtype=torch.long),
                                                   (0, max_len - len(cells[i])), value=pad_id) for i in idx])
        mask = torch.tensor([[1] * lengths[i] + [0] * (max_len - lengths[i]) for i in idx])
        with torch.no_grad():   # model.bert: the MLM head's logits (24 x 2,048 x 25,426) leave hidden_states alone
            embs = model.bert(input_ids=ids, attention_mask=mask,
                              output_hidden_states=True).hidden_states[layer_to_quant]
        lens = torch.as_tensor(lengths[idx])
        if special_token:                                 # <cls> and <eos> in the dictionary
            embs, lens = embs[:, 1:, :], lens - 2
        keep = torch.arange(embs.size(1)) < lens.unsqueeze(1)
        mean = embs.masked_fill(~keep.unsqueeze(2), 0.0).sum(1) / lens.view(-1, 1).float()
        out[idx] = mean.numpy()
    return out


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=8)


def extract(cli, data, checkpoint, st):
    cli.ok("ingest", data, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "geneformer", "--model-dir", checkpoint, "--dtype", "float32",
           "--batch-size", "8", "--quiet")
    X, _ = Store.open(st).load("geneformer", dtype=np.float32)
    return X


@pytest.mark.parametrize("version, input_size", [("V1", 2048), ("V2", 400)])
def test_matches_official_tokenizer_and_emb_extractor(cli, pc9_small, tmp_path, version, input_size):
    """V1: the release's dictionaries and input size (2,048; the first 8 cells are cut there). V2:
    the same dictionaries with <cls>/<eos> added, a 400-token input (cut at 398 genes)."""
    v2 = version == "V2"
    checkpoint = save_geneformer(tmp_path / "gf", v2=v2, max_position_embeddings=input_size, **SMALL)
    ours = extract(cli, pc9_small, checkpoint, tmp_path / "st")
    adata = ad.read_h5ad(pc9_small)
    cells, pad_id = official_rank_value_encoding(adata, checkpoint, input_size, special_token=v2)
    lengths = np.array([len(c) for c in cells])
    assert (lengths == input_size).any() and (lengths < input_size).any()   # cut cells and whole cells
    official = official_cell_embeddings(checkpoint, cells, pad_id, special_token=v2)
    cos = centred_cosines(ours, official)
    print(f"geneformer {version}: min centred cosine {cos.min():.7f} over {len(cos)} cells")
    assert cos.min() >= 0.9999, (version, np.sort(cos)[:5])
