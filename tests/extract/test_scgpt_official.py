"""scGPT against an independent re-statement of the official embedding path, on real PC9 cells.

The re-statement below is written from the official code (github.com/bowang-lab/scGPT), read and
re-expressed with numpy and plain torch ops on the raw state-dict tensors; it uses nothing of
scdrugmap's scGPT module. It follows, in the official order:

* ``scgpt/tasks/cell_emb.py::embed_data``: ``vocab.json`` with ``<pad>``, ``<cls>``, ``<eoc>``
  appended when missing (``GeneVocab.append_token``); ``id_in_vocab`` of each source gene by exact
  symbol, genes not in the vocabulary dropped (``adata[:, id_in_vocab >= 0]``), sizes and
  ``pad_token``/``pad_value`` from ``args.json``;
* ``get_batch_cell_embeddings``: its ``Dataset`` (the dense row, ``np.nonzero``, ``<cls>`` inserted
  first with value ``pad_value``), ``DataCollator(do_padding=True, do_mlm=False, do_binning=True,
  sampling=True, keep_first_n_tokens=1)`` batching the cells in order (``SequentialSampler``,
  ``batch_size`` 64): per cell ``preprocess.py::binning`` of the values after ``<cls>`` (quantile
  edges of the row, ``_digitize(side="both")``: ``ceil(rand * (right - left) + left)``), then
  ``_sample_or_truncate_plus_pad`` to the batch's length (``max_length`` when a cell reaches it,
  else the longest cell): ``_sample`` keeps ``<cls>`` and ``torch.randperm(n - 1)[:max_length - 1]``
  (genes in the permuted order), ``_pad`` fills ``<pad>`` / ``pad_value``;
* ``model/model.py::TransformerModel._encode`` as ``embed_data`` builds it (continuous value
  style, ``pre_norm=False``, flash-attention layers): ``GeneEncoder`` (embedding, LayerNorm) +
  ``ContinuousValueEncoder`` (clamp at 512, Linear, ReLU, Linear, LayerNorm), then
  ``FlashTransformerEncoderLayer`` post-norm (``self_attn.Wqkv`` packed ``(three h d)``,
  softmax scale 1/sqrt(d_head), keys at ``<pad>`` masked, ReLU feed-forward, LayerNorm eps 1e-5),
  no positional encoding, no final norm; the output at position 0, L2-normalised over the rows
  as ``get_batch_cell_embeddings`` does.

The official draws (``np.random.rand`` in ``_digitize``, ``torch.randperm`` in ``_sample``) come
from global generators. scdrugmap draws them, ties first and sampling second as the collator does,
from one numpy ``Generator`` per cell seeded with ``(seed, sha256(dataset name), blake2b of the
cell's matched nonzero columns and counts)``. :func:`scdrugmap_draws` re-derives that generator
for each cell and hands its ``random``/``permutation`` to the re-statement in place of the global
generators: both sides use the same draws (the order in which ``_sample`` lists the kept genes
still differs, which the model, without positional encoding, cannot see).
"""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pytest

from checkpoints import centred_cosines, write_pc9_small
from official_scgpt import save_official_scgpt

torch = pytest.importorskip("torch")

from scdrugmap.store.store import Store  # noqa: E402

SMALL = {"embsize": 64, "nlayers": 2, "nheads": 4, "d_hid": 96}
DATASET = "pc9"


# -- the official path, re-stated ----------------------------------------------------------
def official_vocab(path) -> dict:
    vocab = json.loads(path.read_text())
    for token in ("<pad>", "<cls>", "<eoc>"):
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def official_binning(row: np.ndarray, n_bins: int, rand) -> np.ndarray:
    """preprocess.py::binning of one cell's values (the collator passes the values after <cls>)."""
    if row.max() == 0:
        return np.zeros_like(row)

    def digitize(x, bins):
        left = np.digitize(x, bins)
        right = np.digitize(x, bins, right=True)
        return np.ceil(rand(len(x)) * (right - left) + left).astype(np.int64)

    if row.min() <= 0:
        nonzero = row.nonzero()
        binned = np.zeros_like(row, dtype=np.int64)
        binned[nonzero] = digitize(row[nonzero], np.quantile(row[nonzero], np.linspace(0, 1, n_bins - 1)))
        return binned
    return digitize(row, np.quantile(row, np.linspace(0, 1, n_bins - 1)))


def official_batch(examples, pad_id: int, pad_value: float, max_length: int, n_bins: int, draws):
    """DataCollator.__call__ without MLM: binning, then sample or pad each cell to the batch length."""
    longest = max(len(e["genes"]) for e in examples)
    length = max_length if longest >= max_length else longest
    genes_out, values_out = [], []
    for e in examples:
        rand, randperm = draws(e["id"])
        genes, values = e["genes"], e["expressions"].clone()
        values[1:] = torch.from_numpy(official_binning(values[1:].numpy(), n_bins, rand)).to(values.dtype)
        if len(genes) > length:                                   # _sample, keep_first_n_tokens = 1
            kept = randperm(len(genes) - 1)[: length - 1]
            index = torch.cat([torch.arange(1), kept + 1])
            genes, values = genes[index], values[index]
        elif len(genes) < length:                                 # _pad
            genes = torch.cat([genes, torch.full((length - len(genes),), pad_id, dtype=genes.dtype)])
            values = torch.cat([values, torch.full((length - len(values),), pad_value, dtype=values.dtype)])
        genes_out.append(genes)
        values_out.append(values)
    return torch.stack(genes_out), torch.stack(values_out)


def official_encode(state: dict, args: dict, genes, values, pad_id: int):
    """TransformerModel._encode with the raw tensors; returns (batch, seq, d)."""
    F = torch.nn.functional
    d, heads = args["embsize"], args["nheads"]

    def linear(x, name):
        return x @ state[name + ".weight"].T + state[name + ".bias"]

    def norm(x, name):
        return F.layer_norm(x, (d,), state[name + ".weight"], state[name + ".bias"], eps=1e-5)

    padding = genes.eq(pad_id)                                   # src_key_padding_mask
    x = norm(state["encoder.embedding.weight"][genes], "encoder.enc_norm")
    v = torch.clamp(values.unsqueeze(-1), max=512)
    v = linear(torch.relu(linear(v, "value_encoder.linear1")), "value_encoder.linear2")
    x = x + norm(v, "value_encoder.norm")
    b, n, _ = x.shape
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}."
        if p + "self_attn.Wqkv.weight" in state:                            # flash-attention names
            w, bias = state[p + "self_attn.Wqkv.weight"], state[p + "self_attn.Wqkv.bias"]
        else:                                                                # torch names
            w, bias = state[p + "self_attn.in_proj_weight"], state[p + "self_attn.in_proj_bias"]
        qkv = (x @ w.T + bias).reshape(b, n, 3, heads, d // heads)          # (three h d)
        q, k, val = (qkv[:, :, j].transpose(1, 2) for j in range(3))         # (b, h, n, d_head)
        scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ val).transpose(1, 2).reshape(b, n, d)
        x = norm(x + linear(attended, p + "self_attn.out_proj"), p + "norm1")
        x = norm(x + linear(torch.relu(linear(x, p + "linear1")), p + "linear2"), p + "norm2")
    return x


def official_embed(model_dir, X, symbols, max_length: int = 1200, batch_size: int = 64, draws=None) -> np.ndarray:
    """embed_data(adata, model_dir, gene_col="index") on CPU (fp32), cell embeddings in row order."""
    vocab = official_vocab(model_dir / "vocab.json")
    args = json.loads((model_dir / "args.json").read_text())
    state = torch.load(model_dir / "best_model.pt", map_location="cpu", weights_only=True)
    id_in_vocab = np.array([vocab[g] if g in vocab else -1 for g in symbols])
    counts = np.asarray(X.toarray() if hasattr(X, "toarray") else X)[:, id_in_vocab >= 0]
    gene_ids = id_in_vocab[id_in_vocab >= 0]
    pad_id = vocab[args["pad_token"]]
    if draws is None:                                           # the official global generators
        def draws(_):
            return np.random.rand, torch.randperm

    def item(idx):                                              # get_batch_cell_embeddings.Dataset
        row = counts[idx]
        nonzero = np.nonzero(row)[0]
        return {"id": idx,
                "genes": torch.from_numpy(np.insert(gene_ids[nonzero], 0, vocab["<cls>"])).long(),
                "expressions": torch.from_numpy(np.insert(row[nonzero], 0, args["pad_value"])).float()}

    out = np.zeros((len(counts), args["embsize"]), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(counts), batch_size):
            examples = [item(i) for i in range(start, min(start + batch_size, len(counts)))]
            # the collator hard-codes 51 bins, the release's args.json n_bins
            genes, values = official_batch(examples, pad_id, args["pad_value"], max_length, 51, draws)
            out[start:start + len(examples)] = official_encode(state, args, genes, values, pad_id)[:, 0].numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# -- scdrugmap's per-cell draws ------------------------------------------------------------
def scdrugmap_draws(X, symbols, vocab_path, seed: int = 0, dataset: str = DATASET):
    """For each cell, the generator scdrugmap draws from (see the scgpt module's docstring): seeded
    with the seed, the first 8 bytes of sha256(dataset name) and an 8-byte blake2b digest of the
    cell's nonzero positions among the matched genes (int64) and their counts (float64)."""
    vocab = json.loads(vocab_path.read_text())
    matched = np.array([s in vocab for s in symbols])
    counts = np.asarray(X.toarray(), dtype=np.float32)[:, matched]
    salt = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")

    def draws(i):
        nonzero = np.flatnonzero(counts[i])
        digest = hashlib.blake2b(nonzero.astype(np.int64).tobytes() + counts[i, nonzero].astype(np.float64).tobytes(),
                                 digest_size=8).digest()
        rng = np.random.default_rng([seed, salt, int.from_bytes(digest, "little")])
        return rng.random, lambda n: torch.from_numpy(rng.permutation(n))

    return draws


# -- the test --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Random weights in the whole-human release's layout (flash-attention names), real vocab and args."""
    return save_official_scgpt(tmp_path_factory.mktemp("scgpt") / "release", variant="flash", seed=5, **SMALL)


@pytest.fixture(scope="module")
def pc9_cells(tmp_path_factory):
    """12 control cells (3,500-5,400 genes in the vocabulary: sampled to 1,199) and 12 erlotinib
    cells (300-530: not sampled)."""
    path = write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=12)
    a = ad.read_h5ad(path)
    return path, a.X, np.asarray(a.var_names.astype(str))


@pytest.mark.parametrize("seed, max_length", [(0, None), (7, 300)])
def test_cli_embeddings_equal_the_official_path(cli, release, pc9_cells, tmp_path, seed, max_length):
    path, X, symbols = pc9_cells
    st = tmp_path / "st"
    cli.ok("ingest", path, "--store", st, "--dataset", DATASET, "--label-col", "response")
    options = ["--option", f"seed={seed}"] + (["--option", f"max_length={max_length}"] if max_length else [])
    cli.ok("extract", "--store", st, "--backbone", "scgpt", "--model-dir", release, "--batch-size", "8",
           "--dtype", "float32", "--quiet", *options)
    ours, _ = Store.open(st).load("scgpt", dtype=np.float32)

    # batches of 4 (embed_data's batch_size): the erlotinib cells are padded to the batch's longest
    draws = scdrugmap_draws(X, symbols, release / "vocab.json", seed=seed)
    theirs = official_embed(release, X, symbols, max_length=max_length or 1200, batch_size=4, draws=draws)
    cosines = centred_cosines(ours, theirs)
    assert ours.shape == theirs.shape == (24, SMALL["embsize"])
    assert cosines.min() >= 0.9999, cosines.round(6)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    if max_length is None:
        # the comparison sees the draws: with another seed's draws, the sampled control cells and
        # the erlotinib cells (not sampled: only their tie-breaking changes) all move
        other = official_embed(release, X, symbols, batch_size=4,
                               draws=scdrugmap_draws(X, symbols, release / "vocab.json", seed=seed + 1))
        assert centred_cosines(ours, other).max() < 0.9999
