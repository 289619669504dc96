"""UCE against an independent re-statement of the official embedding path.

The re-statement below was written from the official code (github.com/snap-stanford/UCE at
commit 8ead6e0), re-expressed with numpy, pandas and plain torch ops on the raw state dict; it
uses none of scdrugmap's modules. It follows the official order of ``eval_single_anndata.py``:

1. ``data_proc/data_utils.py::process_raw_anndata`` (``--filter`` true): ``filter_genes(min_cells=10)``
   then ``filter_cells(min_genes=25)`` on the raw counts, then
   ``data_proc/gene_embeddings.py::load_gene_embeddings_adata``: the genes whose lower-cased
   symbol is a key of the species' protein-embedding dict, in the dataset's order; the counts are
   written to an int64 memmap (truncated);
2. ``data_utils.py::adata_path_to_prot_chrom_starts``: a gene's token row is the position of its
   upper-cased symbol among the dict's upper-cased keys plus the species offset; its chromosome
   code is its ``"<species>_<chromosome>"`` category over the whole ``species_chrom.csv``
   (``get_spec_chrom_csv``) and its start the CSV's ``start``;
3. ``eval_data.py::MultiDatasetSentences.__getitem__`` and ``sample_cell_sentences``: weights
   ``torch.log1p`` of the int64 counts (float32), normalised twice as there; 1,024 genes drawn with
   ``choice(p=...)`` over *all* genes, sorted by chromosome, the chromosomes shuffled, genes by
   start inside each; ``[CLS] [chrom] genes [close] ...``;
4. ``evaluate.py::run_eval`` and ``get_ESM2_embeddings``: the checkpoint's ``pe_embedding`` unless
   ``all_tokens.torch`` (+ 1,895 rows drawn after ``torch.manual_seed(23)`` when it has 143,574)
   has another row count; token rows L2-normalised; ``model.py::TransformerModel.forward``:
   ``encoder`` (Linear, GELU, LayerNorm) x sqrt(d_model) + ``pos_encoder.pe``, post-norm ReLU
   encoder layers (``nn.TransformerEncoderLayer`` defaults, 20 heads from ``run_eval``), the
   ``decoder``, the CLS position, L2-normalised.

The official code runs every cell of a batch padded to the batch's longest sentence with a float
key-padding mask that *adds* 1.0 to the logits of padded keys; a cell alone in its batch (official
``--batch_size 1``) has no padding, and that is what the re-statement runs, cell by cell, and
what scdrugmap's default ``padding_mask=proper`` equals.

**Draws.** Official runs never seed numpy (the global generator). The re-statement takes one
``np.random.RandomState`` per cell and re-derives its seed independently, from scdrugmap's
documented rule (blake2b-128 of the int64 seed, the dataset name, a zero byte, the int64 positions
of the cell's nonzero genes among the used genes and their float64 counts, as four uint32 words),
then makes the official sequence of calls on it (``choice`` over all genes, then ``shuffle``).
It does not read scdrugmap's sentences. The official weights are float32; a float32 and a float64
cumulative sum can send a draw that falls within about 1e-7 of a boundary to the neighbouring
gene. ``test_the_official_sampling_draws_the_same_sentences`` counts how often that happens
(scdrugmap uses float64, a documented difference).

**Files.** ``write_model_files`` leaves five protein-embedding genes without a
``species_chrom.csv`` row, which makes the official code stop with a KeyError
(scdrugmap drops them, documented). The model files here give them a row, so the official path
runs unchanged on the same checkpoint.

**Sizes.** ``run_eval`` builds the model at ``emsize = 1280`` with ``token_dim``, ``d_hid``,
``nlayers`` and ``output_dim`` from the argparse defaults; the re-statement reads every size from
the checkpoint's tensors (20 heads stay hard-coded): where the released files and the official
code disagree, the files win (docs/backbones.md, UCE).

Checkpoint: random weights in the official key layout (``official_uce.py``: token_dim 16,
d_model 80, 2 layers, real table row counts). Cells: 24 real PC9 cells.
"""

from __future__ import annotations

import hashlib
import math
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import H5adSource, centred_cosines, write_pc9_small
from official_uce import HUMAN_PE, write_model_files

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.store.store import Store  # noqa: E402

CKPT = "4layer_model.torch"
SPECIES = "human"
DATASET = "pc9"
# eval_single_anndata.py argparse defaults
SAMPLE_SIZE, PAD_LENGTH, CLS, CHROM_RIGHT, PAD, CHROM_OFFSET = 1024, 1536, 3, 2, 0, 143574
NHEAD = 20                                               # evaluate.run_eval
MIN_CELLS, MIN_GENES = 10, 25                            # process_raw_anndata's filters
N_CELLS = 24                                             # real PC9 cells: the first and last 12


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=N_CELLS // 2)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, pc9_small):
    """Official layout; every protein-embedding gene has a species_chrom.csv row (see the docstring)."""
    a = ad.read_h5ad(pc9_small)
    detected = np.asarray((sp.csr_matrix(a.X) > 0).sum(0)).ravel()
    symbols = np.asarray(a.var_names.astype(str))
    genes = list(symbols[detected >= 10][:2500]) + list(symbols[detected == 0][:300])
    return place_every_gene(write_model_files(tmp_path_factory.mktemp("uce") / "model_files", genes))


def place_every_gene(folder):
    """Give the protein-embedding genes without a species_chrom.csv row one (chromosome 17)."""
    keys = {k.upper() for k in torch.load(folder / "protein_embeddings" / HUMAN_PE, weights_only=True)}
    csv = pd.read_csv(folder / "species_chrom.csv", dtype={"chromosome": str})
    missing = sorted(keys - set(csv.loc[csv["species"] == SPECIES, "gene_symbol"]))
    assert 0 < len(missing) <= 5
    extra = pd.DataFrame({"gene_symbol": missing, "chromosome": "17",
                          "start": [2_000_000_000 + 1000 * i for i in range(len(missing))], "species": SPECIES})
    pd.concat([csv, extra]).to_csv(folder / "species_chrom.csv", index=False)
    return folder


# ---- the official path, re-stated ----------------------------------------------------------------
def official_preprocess(h5ad, folder):
    """Steps 1-2: (int64 counts cells x used genes, token rows, chromosome codes, starts)."""
    a = ad.read_h5ad(h5ad)
    X = sp.csr_matrix(a.X)
    names = np.asarray(a.var_names.astype(str))
    # sc.pp.filter_genes(min_cells=10), then sc.pp.filter_cells(min_genes=25)
    genes_ok = np.asarray((X > 0).sum(0)).ravel() >= MIN_CELLS
    X, names = X[:, genes_ok], names[genes_ok]
    cells_ok = np.asarray((X > 0).sum(1)).ravel() >= MIN_GENES
    assert cells_ok.all()                      # a real PC9 cell has far more genes: no cell is dropped
    # load_gene_embeddings_adata: the dict's keys lower-cased, var names compared lower-cased
    pe = torch.load(folder / "protein_embeddings" / HUMAN_PE, weights_only=True)
    lower = {k.lower() for k in pe}
    keep = np.array([n.lower() in lower for n in names])
    X, names = X[:, keep], names[keep]
    counts = X.toarray().astype(np.float32).astype(np.int64)             # the int64 memmap
    # adata_path_to_prot_chrom_starts
    spec_pe_genes = list({k.upper(): v for k, v in pe.items()})         # get_species_to_pe
    with open(folder / "species_offsets.pkl", "rb") as f:
        offset = pickle.load(f)[SPECIES]
    token_rows = np.array([spec_pe_genes.index(n.upper()) + offset for n in names], dtype=np.int64)
    table = pd.read_csv(folder / "species_chrom.csv")
    table["spec_chrom"] = pd.Categorical(table["species"] + "_" + table["chromosome"])
    spec = table[table["species"] == SPECIES].set_index("gene_symbol")
    rows = spec.loc[[n.upper() for n in names]]
    assert len(rows) == len(names)             # one row per gene (a repeated symbol would misalign)
    return counts, token_rows, rows["spec_chrom"].cat.codes.to_numpy(), rows["start"].to_numpy()


def cell_generator(seed, dataset, counts_row):
    """The cell's own RandomState, its seed re-derived from scdrugmap's documented rule."""
    nonzero = np.flatnonzero(counts_row)
    h = hashlib.blake2b(digest_size=16)
    for part in (np.int64(seed).tobytes(), dataset.encode() + b"\0", nonzero.astype(np.int64).tobytes(),
                 counts_row[nonzero].astype(np.float64).tobytes()):
        h.update(part)
    return np.random.RandomState(np.frombuffer(h.digest(), dtype=np.uint32))


def official_sentence(counts_row, token_rows, chroms, starts, rng, float64_weights=False):
    """Step 3, eval_data.sample_cell_sentences for one cell, ``rng`` in place of ``np.random``."""
    weights = torch.log1p(torch.tensor(counts_row).unsqueeze(0))        # int64 -> float32, as there
    if float64_weights:
        weights = weights.double()
    weights = (weights / torch.sum(weights))[0].numpy()
    weights = weights / sum(weights)                                    # "RE NORM after mask"
    choice = rng.choice(np.arange(len(weights)), size=SAMPLE_SIZE, p=weights, replace=True)
    choice = choice[np.argsort(chroms[choice])]
    new_chrom, chosen_starts = chroms[choice], starts[choice]
    sentence = [CLS]
    uq_chroms = np.unique(new_chrom)
    rng.shuffle(uq_chroms)
    for c in uq_chroms:
        loc = np.where(new_chrom == c)[0]
        sentence += [int(c) + CHROM_OFFSET, *token_rows[choice[loc[np.argsort(chosen_starts[loc])]]], CHROM_RIGHT]
    assert len(sentence) <= PAD_LENGTH
    return torch.tensor(sentence, dtype=torch.long)


def official_token_table(folder, state):
    """Step 4: the table run_eval ends up with."""
    all_pe = torch.load(folder / "all_tokens.torch", weights_only=True)
    if all_pe.shape[0] == CHROM_OFFSET:
        torch.manual_seed(23)
        all_pe = torch.vstack((all_pe, torch.normal(mean=0, std=1, size=(1895, all_pe.shape[1]))))
    return state["pe_embedding.weight"] if all_pe.shape[0] == 145469 else all_pe


def official_embedding(s, table, sentence):
    """TransformerModel.forward for one cell with no padding, in fp32 (as the official runs) from the
    raw state dict. The decoder reads the CLS position only, so the last layer computes its CLS row
    only: the other rows of that layer never reach the embedding (exact, and twice as fast)."""
    d = s["encoder.0.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("transformer_encoder.layers."))
    x = table[sentence].float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)               # F.normalize over the token dim
    x = F.gelu(x @ s["encoder.0.weight"].T + s["encoder.0.bias"])
    x = F.layer_norm(x, (d,), s["encoder.2.weight"], s["encoder.2.bias"]) * math.sqrt(d)
    x = x + s["pos_encoder.pe"][: len(sentence), 0]
    dh = d // NHEAD
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        q, k, v = (x @ s[p + "self_attn.in_proj_weight"].T + s[p + "self_attn.in_proj_bias"]).split(d, dim=-1)
        if i == n_layers - 1:
            x, q = x[:1], q[:1]
        q, k, v = (t.reshape(len(t), NHEAD, dh).transpose(0, 1) for t in (q, k, v))    # heads, positions, dh
        scores = q @ k.transpose(1, 2) / math.sqrt(dh)                  # + (1 - mask) = 0: no padding
        attn = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(len(x), d)
        attn = attn @ s[p + "self_attn.out_proj.weight"].T + s[p + "self_attn.out_proj.bias"]
        x = F.layer_norm(x + attn, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        ff = F.relu(x @ s[p + "linear1.weight"].T + s[p + "linear1.bias"]) @ s[p + "linear2.weight"].T
        x = F.layer_norm(x + ff + s[p + "linear2.bias"], (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
    h = x[0]                                                            # CLS
    for j in range(3):                                                  # full_block: Linear, LayerNorm, GELU
        w = f"decoder.{j}."
        h = h @ s[w + "0.weight"].T + s[w + "0.bias"]
        h = F.gelu(F.layer_norm(h, h.shape, s[w + "1.weight"], s[w + "1.bias"]))
    h = h @ s["decoder.3.weight"].T + s["decoder.3.bias"]
    return h / h.norm().clamp_min(1e-12)


def official_sentences(h5ad, folder, seed=0, dataset=DATASET, float64_weights=False):
    counts, token_rows, chroms, starts = official_preprocess(h5ad, folder)
    return [official_sentence(row, token_rows, chroms, starts, cell_generator(seed, dataset, row), float64_weights)
            for row in counts]


def official_embeddings(folder, sentences):
    state = torch.load(folder / CKPT, weights_only=True)
    table = official_token_table(folder, state)
    s = {k: v.float() for k, v in state.items() if k != "pe_embedding.weight"}
    with torch.no_grad():
        return torch.stack([official_embedding(s, table, sent) for sent in sentences]).numpy()


class UpperSource(H5adSource):
    """What UCE reads of a dataset, as the store gives it: upper-cased symbols."""

    def symbols(self, upper=True):
        return np.char.upper(np.asarray(super().symbols(), dtype=str))

    @property
    def X(self):
        return sp.csr_matrix(self.adata.X)


# ---- tests ----------------------------------------------------------------------------------------
def test_cli_embedding_matches_the_official_path(cli, model_files, pc9_small, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", DATASET, "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "uce", "--model-dir", model_files, "--dtype", "float32",
           "--batch-size", "7", "--quiet")
    ours = Store.open(st).load("uce")[0]
    ref = official_embeddings(model_files, official_sentences(pc9_small, model_files))
    assert ours.shape == ref.shape == (N_CELLS, 48)
    cos = centred_cosines(ours.astype(np.float64), ref.astype(np.float64))
    print(f"UCE centred cosine vs the official re-statement: min {cos.min():.8f}, "
          f"max |diff| {np.abs(ours - ref).max():.2e}")
    assert cos.min() >= 0.9999, cos.min()
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_official_sampling_draws_the_same_sentences(model_files, pc9_small, seed):
    """With the same generator, the float64 variant of the official sampling gives scdrugmap's
    sentences exactly, and the official float32 weights pick the same genes here (a draw within
    about 1e-7 of a cumulative-sum boundary could differ)."""
    from scdrugmap.extract.backbones.uce import UCE

    sentences32 = official_sentences(pc9_small, model_files, seed=seed)
    sentences64 = official_sentences(pc9_small, model_files, seed=seed, float64_weights=True)
    model = UCE(model_dir=model_files, options={"seed": seed})
    source = UpperSource(pc9_small, name=DATASET)
    tok = model.cell_tokenizer(source)
    x = tok.prepare(source.X)
    ours = [tok.tokens(x, i) for i in range(x.shape[0])]
    assert len(ours) == len(sentences64) == N_CELLS
    assert all(np.array_equal(o, s.numpy()) for o, s in zip(ours, sentences64))
    differing = sum(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(sentences32, sentences64))
    print(f"UCE seed {seed}: {differing} of {N_CELLS} cells' sentences differ between float32 and float64 weights")
    assert differing <= 1
