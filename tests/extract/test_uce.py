"""UCE: official model_files layout (real token-table row counts, shrunk sizes), random weights,
checked against hand-worked sentences and a reference forward pass built from plain torch
modules (``nn.TransformerEncoderLayer``) and the raw state dict."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import write_pc9_small
from conftest import snapshot
from official_uce import HUMAN_PE, N_TOKENS, SMALL, official_keys, write_model_files

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.errors import UserError  # noqa: E402
from scdrugmap.extract.backbones.uce import (CHROM_TOKEN_OFFSET, UCE, SentenceTokenizer,  # noqa: E402
                                             official_padding, read_species_genes)
from scdrugmap.store.store import Store  # noqa: E402

CKPT = "4layer_model.torch"


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=20)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, pc9_small):
    """The human protein-embedding dict covers 2,500 PC9 genes detected in >= 10 of the 40 cells
    and 300 undetected ones (dropped by the official min_cells filter)."""
    a = ad.read_h5ad(pc9_small)
    detected = np.asarray((sp.csr_matrix(a.X) > 0).sum(0)).ravel()
    symbols = np.asarray(a.var_names.astype(str))
    genes = list(symbols[detected >= 10][:2500]) + list(symbols[detected == 0][:300])
    return write_model_files(tmp_path_factory.mktemp("uce") / "model_files", genes)


class Source:
    """What the backbone reads of a dataset: its name, symbols and counts."""

    def __init__(self, X, symbols, name="pc9"):
        self.X, self.names, self.name = sp.csr_matrix(X), np.asarray(symbols, dtype=str), name
        self.n_cells = self.X.shape[0]

    @classmethod
    def read(cls, path, name="pc9"):
        a = ad.read_h5ad(path)
        return cls(a.X, a.var_names.astype(str), name)

    def symbols(self, upper=True):
        return np.array([s.upper() for s in self.names]) if upper else self.names

    def rows(self, lo, hi):
        return self.X[lo:hi]


def clone(folder, dst):
    """A copy of the model files made of symbolic links (edit with :func:`replace`)."""
    (dst / "protein_embeddings").mkdir(parents=True)
    for p in folder.rglob("*"):
        if p.is_file():
            (dst / p.relative_to(folder)).symlink_to(p)
    return dst


def replace(path, write):
    path.unlink()
    write(path)


def edit_state(folder, edit):
    state = torch.load(folder / CKPT, weights_only=True)
    edit(state)
    replace(folder / CKPT, lambda p: torch.save(state, p))


def padded(sentences, width=None):
    width = width or max(len(s) for s in sentences)
    ids = torch.zeros((len(sentences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sentences):
        ids[r, :len(s)] = torch.from_numpy(s)
        mask[r, :len(s)] = 1
    return ids, mask


# ---- references written from the official code -----------------------------------------------------
def official_sentence(counts, rows, codes, starts, rng, sample_size=1024, pad_length=1536):
    """eval_data.sample_cell_sentences for one cell (dense weights over every gene), with ``rng`` in
    place of the global numpy generator."""
    weights = np.log1p(counts)
    weights = weights / weights.sum()
    choice_idx = rng.choice(np.arange(len(weights)), size=sample_size, p=weights, replace=True)
    choice_idx = choice_idx[np.argsort(codes[choice_idx])]
    new_chrom, chosen_starts = codes[choice_idx], starts[choice_idx]
    seq = np.full(pad_length, 3)
    i = 1
    uq_chroms = np.unique(new_chrom)
    rng.shuffle(uq_chroms)
    for chrom in uq_chroms:
        seq[i] = int(chrom) + CHROM_TOKEN_OFFSET
        i += 1
        loc = np.where(new_chrom == chrom)[0]
        to_add = choice_idx[loc[np.argsort(chosen_starts[loc])]]
        seq[i:i + len(to_add)] = rows[to_add]
        i += len(to_add)
        seq[i] = 2
        i += 1
    seq[i:] = 0
    return seq, i


def reference_tokens(state, rows):
    d = state["encoder.0.weight"].shape[0]
    x = F.normalize(state["pe_embedding.weight"][rows], dim=-1)
    x = F.gelu(x @ state["encoder.0.weight"].T + state["encoder.0.bias"])
    return F.layer_norm(x, (d,), state["encoder.2.weight"], state["encoder.2.bias"]) * math.sqrt(d)


def reference_embedding(state, ids, mask, additive):
    """TransformerModel.forward as evaluate.run_eval calls it: (length, batch) layout, torch's own
    TransformerEncoder loaded from the in_proj keys, the mask passed as a float ``1 - mask``
    (official) or a bool padding mask."""
    d, d_hid = state["encoder.0.weight"].shape[0], state["transformer_encoder.layers.0.linear1.weight"].shape[0]
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    src = reference_tokens(state, ids).permute(1, 0, 2) + state["pos_encoder.pe"][:ids.shape[1]]
    layer = torch.nn.TransformerEncoderLayer(d, 20, d_hid, dropout=0.0)
    encoder = torch.nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
    encoder.load_state_dict({k[len("transformer_encoder."):]: v for k, v in state.items()
                             if k.startswith("transformer_encoder.")})
    encoder.eval()
    key_padding = (1 - mask).float() if additive else mask == 0
    with torch.no_grad():
        h = encoder(src, src_key_padding_mask=key_padding)[0]
        for j in range(3):
            p = f"decoder.{j}."
            h = h @ state[p + "0.weight"].T + state[p + "0.bias"]
            h = F.gelu(F.layer_norm(h, h.shape[-1:], state[p + "1.weight"], state[p + "1.bias"]))
        h = h @ state["decoder.3.weight"].T + state["decoder.3.bias"]
    return F.normalize(h, dim=1)


# ---- tests ----------------------------------------------------------------------------------------
def test_strict_load_of_the_official_key_layout(model_files):
    model = UCE(model_dir=model_files)
    state = torch.load(model_files / CKPT, weights_only=True)
    assert list(state) == list(official_keys(**SMALL))
    ours = model.model.state_dict()
    for k, v in ours.items():                                 # every weight used came from the file
        assert torch.equal(v, state[k]), k
    assert {k.split(".")[0] for k in set(state) - set(ours)} == {"binary_decoder", "gene_embedding_layer",
                                                               "pe_embedding"}
    assert (model.dim, model.dims.layers, model.dims.d_model, model.dims.token_dim) == (48, 2, 80, 16)
    params = model.params()
    assert params["token_table"] == "checkpoint pe_embedding.weight" and params["all_tokens_rows"] == N_TOKENS
    assert params["chromosome_categories"] == 13 and params["protein_embeddings"] == HUMAN_PE
    rows = torch.tensor([0, 2, 3])                            # pad, chromosome close, CLS
    torch.testing.assert_close(model.table[model.local[rows]], reference_tokens(state, rows))
    assert torch.equal(model.table[model.local[0]], reference_tokens(state, torch.tensor([0]))[0])
    assert UCE(model_dir=model_files, options={"nlayers": "2"}).dims.layers == 2
    with pytest.raises(UserError, match="holds 2 layers"):
        UCE(model_dir=model_files, options={"nlayers": "33"})


def test_binary_decoder_width_is_output_dim_plus_1280(cli, model_files, pc9_small, tmp_path):
    """model.py builds ``full_block(output_dim + 1280, 2048)``: a literal 1280, not d_model. A
    checkpoint of the official class at another width (here d_model 80) loads and embeds; one whose
    binary decoder takes output_dim + d_model (not what the official class builds) is refused."""
    o, d = SMALL["output_dim"], SMALL["d_model"]
    assert d != 1280
    state = torch.load(model_files / CKPT, weights_only=True)
    assert tuple(state["binary_decoder.0.0.weight"].shape) == (2048, o + 1280)
    model = UCE(model_dir=model_files)
    source = Source.read(pc9_small)
    emb = model.embed_block(source.X[:3], model.cell_tokenizer(source))
    assert emb.shape == (3, o) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "uce", "--model-dir", model_files, "--quiet")
    assert Store.open(st).load("uce")[0].shape == (40, o)
    before = snapshot(st)
    folder = clone(model_files, tmp_path / "d_model_wide")
    edit_state(folder, lambda s: s.update({"binary_decoder.0.0.weight": torch.zeros(2048, o + d)}))
    err = cli.fails("extract", "--store", st, "--backbone", "uce", "--model-dir", folder, "--quiet", "--force",
                    match=f"1 mis-sized (e.g. binary_decoder.0.0.weight (2048, {o + d}), expected (2048, {o + 1280}))")
    assert "missing" not in err and "unexpected" not in err
    assert snapshot(st) == before


def test_species_genes_by_hand(tmp_path):
    vec = torch.zeros(4)
    torch.save({"EGFR": vec, "tp53": vec, "KRAS": vec, "Egfr": vec, "MYC": vec}, tmp_path / "h.pt")
    with open(tmp_path / "o.pkl", "wb") as f:
        pickle.dump({"human": 10, "mouse": 2}, f)
    pd.DataFrame([("EGFR", "7", 55019017, "human"), ("TP53", "17", 7661779, "human"),
                  ("KRAS", "12", 25205246, "human"), ("KRAS", "1", 999, "human"), ("MYC", "8", 127735434, "human"),
                  ("Egfr", "11", 16000000, "mouse"), ("XIST", "X", 73820651, "human"),
                  ("MT-CO1", "MT", 5904, "human")],
                 columns=["gene_symbol", "chromosome", "start", "species"]).to_csv(tmp_path / "c.csv", index=False)
    g = read_species_genes(tmp_path / "c.csv", tmp_path / "o.pkl", tmp_path / "h.pt", "human")
    # upper-cased keys, the first position of EGFR/Egfr kept: MYC is the 4th key, not the 5th
    assert g.rows == {"EGFR": 10, "TP53": 11, "KRAS": 12, "MYC": 13} and g.n_embedded == 4 and g.offset == 10
    # categories over every row, sorted strings: human_1 (KRAS's second row), human_12, human_17, human_7,
    # human_8, human_MT, human_X, mouse_11; a gene's first row is kept
    assert g.n_categories == 8
    assert g.chrom == {"EGFR": (3, 55019017.0), "TP53": (2, 7661779.0), "KRAS": (1, 25205246.0),
                       "MYC": (4, 127735434.0), "XIST": (6, 73820651.0), "MT-CO1": (5, 5904.0)}


def test_sentences_by_hand():
    rows = np.array([100, 101, 102, 103, 104, 105])
    codes = np.array([4, 0, 4, 2, 0, 7])
    starts = np.array([50.0, 10.0, 20.0, 5.0, 30.0, 1.0])
    tok = SentenceTokenizer(rows, codes, starts, np.arange(6), seed=0, dataset="toy", max_length=1536)
    X = sp.csr_matrix(np.array([[3, 0, 1, 7, 2, 0], [0] * 6, [0, 0, 0, 0, 0, 2.7], [0.5, 0, 0, 0, 0, 0]]))
    x = tok.prepare(X)
    ids = tok.tokens(x, 0)
    # CLS, then 3 chromosome blocks (gene 1 has no count): 1 + 1024 + 2 x 3 tokens
    assert ids[0] == 3 and len(ids) == 1031 and list(tok.lengths(x)) == [1031, 1, 1027, 1]
    blocks = np.split(ids[1:], np.flatnonzero(ids[1:] == 2) + 1)[:-1]
    assert [b[-1] for b in blocks] == [2, 2, 2] and sum(len(b) for b in blocks) == 1030
    chrom_of = {100: 4, 102: 4, 103: 2, 104: 0}
    assert sorted(b[0] - CHROM_TOKEN_OFFSET for b in blocks) == [0, 2, 4]
    for b in blocks:
        genes = b[1:-1]
        assert {chrom_of[g] for g in genes} == {b[0] - CHROM_TOKEN_OFFSET}
        assert np.all(np.diff(starts[genes - 100]) >= 0)          # by genomic start
    # proportional to log1p(count), with replacement
    weights = np.log1p([3, 1, 7, 2]) / np.log1p([3, 1, 7, 2]).sum()
    drawn = np.array([(ids == r).sum() for r in (100, 102, 103, 104)])
    assert np.all(np.abs(drawn - 1024 * weights) < 5 * np.sqrt(1024 * weights * (1 - weights)))
    # the official algorithm (dense weights, global-generator calls) with the cell's own generator
    lo, hi = x.indptr[0], x.indptr[1]
    seq, n = official_sentence(np.array([3, 0, 1, 7, 2, 0.0]), rows, codes, starts,
                               tok.rng(x.indices[lo:hi], x.data[lo:hi]))
    assert n == len(ids) and np.array_equal(seq[:n], ids) and not seq[n:].any()
    # reproducible, and only the cell's own content counts (not its block or position)
    assert np.array_equal(tok.tokens(tok.prepare(X[[1, 3, 0]]), 2), ids)
    for other in (SentenceTokenizer(rows, codes, starts, np.arange(6), seed=1, dataset="toy", max_length=1536),
                  SentenceTokenizer(rows, codes, starts, np.arange(6), seed=0, dataset="toy2", max_length=1536)):
        assert not np.array_equal(other.tokens(x, 0), ids)
    # counts are truncated to integers (the official int64 memmap); no expressed gene: CLS alone
    assert tok.tokens(x, 1).tolist() == [3] and tok.tokens(x, 3).tolist() == [3]
    assert tok.tokens(x, 2).tolist() == [3, CHROM_TOKEN_OFFSET + 7] + [105] * 1024 + [2]
    # padding: the engine pads with 0; the official mode pads every cell to all 1,536 positions
    p_ids, p_mask = official_padding(*padded([ids, tok.tokens(x, 2)]), 1536)
    assert p_ids.shape == (2, 1536) and p_ids[1, 1027:].eq(0).all() and p_mask.sum(1).tolist() == [1031, 1027]
    short = SentenceTokenizer(rows, codes, starts, np.arange(6), seed=0, dataset="toy", max_length=1030)
    with pytest.raises(UserError, match="more than the model's 1030 positions"):
        short.tokens(x, 0)


def test_embedding_matches_reference_and_ignores_batching(model_files, pc9_small):
    state = torch.load(model_files / CKPT, weights_only=True)
    source = Source.read(pc9_small)
    model = UCE(model_dir=model_files)
    tok = model.cell_tokenizer(source)
    sparse_cell = sp.csr_matrix((np.array([4.0, 1.0, 9.0]), tok.cols[:3], [0, 3]), shape=(1, source.X.shape[1]))
    X = sp.vstack([source.X[[0, 1]], sparse_cell, source.X[[38]]]).tocsr()     # PC9 cells: all 9 chromosomes
    x = tok.prepare(X)
    sentences = [tok.tokens(x, i) for i in range(4)]
    assert len({len(s) for s in sentences}) > 1                    # the batch holds padding
    ids, mask = padded(sentences)
    with torch.inference_mode():
        proper = model.pool(ids, mask)
    torch.testing.assert_close(proper, reference_embedding(state, ids, mask, additive=False), atol=1e-4, rtol=1e-4)
    assert torch.allclose(proper.norm(dim=1), torch.ones(4))
    blocks = {}
    for mode in ("proper", "official"):
        model.config["padding_mask"] = mode
        model.batch_size = 4
        blocks[mode] = model.embed_block(X, tok)
        assert np.array_equal(model.embed_block(X, tok), blocks[mode])        # deterministic
        model.batch_size = 1                                                 # alone in its batch
        np.testing.assert_allclose(model.embed_block(X, tok), blocks[mode], atol=1e-5)
    np.testing.assert_allclose(blocks["proper"][np.argsort([0, 1, 2, 3])], proper.numpy(), atol=1e-5)
    # official mode: the additive +1.0 on padded keys, every cell padded to 1,536
    full_ids, full_mask = official_padding(ids, mask, 1536)
    ref = reference_embedding(state, full_ids, full_mask, additive=True)
    np.testing.assert_allclose(blocks["official"], ref.numpy(), atol=1e-4, rtol=1e-4)
    assert np.abs(blocks["official"] - blocks["proper"]).max() > 1e-2
    # a cell's sentence depends on the seed
    model.config["padding_mask"], model.config["seed"] = "proper", 1
    assert np.abs(model.embed_block(X, model.cell_tokenizer(source)) - blocks["proper"]).max() > 1e-3


def test_token_table_choice(model_files, tmp_path):
    state = torch.load(model_files / CKPT, weights_only=True)
    folder = clone(model_files, tmp_path / "absent")
    (folder / "all_tokens.torch").unlink()
    model = UCE(model_dir=folder)
    assert model.params()["token_table"] == "checkpoint pe_embedding.weight (all_tokens.torch absent)"
    rows = torch.tensor([3, 2, CHROM_TOKEN_OFFSET + 5, model.genes.offset + 7])     # + a human gene
    model._add_rows(rows.numpy())
    torch.testing.assert_close(model.table[model.local[rows]], reference_tokens(state, rows))
    # another row count (a new-species table): the official code uses all_tokens.torch instead
    folder = clone(model_files, tmp_path / "other")
    table = torch.randn(145000, SMALL["token_dim"])
    replace(folder / "all_tokens.torch", lambda p: torch.save(table, p))
    model = UCE(model_dir=folder)
    assert model.params()["token_table"] == "all_tokens.torch" and model.params()["all_tokens_rows"] == 145000
    model._add_rows(rows.numpy())
    torch.testing.assert_close(model.table[model.local[rows]],
                               reference_tokens({**state, "pe_embedding.weight": table}, rows))


def test_extract_on_real_pc9_cells(cli, model_files, pc9_small, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "uce", "--model-dir", model_files, "--quiet")
    out = cli.ok(*base).output
    assert "40 cells x 48 (float16)" in out
    X, cells = Store.open(st).load("uce")
    assert X.shape == (40, 48) and X.dtype == np.float16 and len(cells) == 40
    prov = Store.open(st).provenance("uce").iloc[0]
    params = json.loads(prov["params"])
    assert params["seed"] == 0 and params["padding_mask"] == "proper" and params["species"] == "human"
    assert params["checkpoint"] == CKPT and params["layers"] == 2 and params["sample_size"] == 1024
    assert params["token_table"] == "checkpoint pe_embedding.weight" and params["min_cells"] == 10
    keys = {k.upper() for k in torch.load(model_files / "protein_embeddings" / HUMAN_PE, weights_only=True)}
    symbols = Source.read(pc9_small).symbols()
    assert params["genes_in_dataset"] == len(symbols) == 25077
    assert params["genes_with_embedding"] == sum(s in keys for s in symbols) > 2800
    assert params["genes_with_embedding"] == (params["genes_without_position"] + params["genes_below_min_cells"]
                                              + params["genes_matched"])
    assert params["genes_below_min_cells"] >= 295 and params["genes_matched"] >= 2490 and params["chromosomes"] == 9
    assert len(prov["checkpoint_sha256"]) == 64
    source = Source.read(pc9_small)
    model = UCE(model_dir=model_files)
    direct = model.embed_block(source.X, model.cell_tokenizer(source))
    np.testing.assert_allclose(X.astype(np.float32), direct, atol=2e-3)
    # chunks of 7 rows and other batches: the same embeddings (each cell's sample is its own)
    cli.ok(*base, "--force", "--chunk-rows", "7", "--batch-size", "3", "--dtype", "float32")
    np.testing.assert_allclose(Store.open(st).load("uce")[0], direct, atol=1e-5)


def test_peak_memory_of_the_token_table(tmp_path):
    """A 145,469 x 512 table (298 MB in the checkpoint, 294 MB in all_tokens.torch) is memory-mapped:
    loading the model and building a dataset's token table raise the peak RSS (Linux's VmHWM, reset
    before each step) far less than the table's size."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    genes = [f"G{i}" for i in range(2000)]
    folder = write_model_files(tmp_path / "mf", genes, token_dim=512)
    table_bytes = 145469 * 512 * 4
    script = r"""
import json, re, sys
import numpy as np, pandas, scipy.sparse as sp, torch      # imported before measuring
import torch.nn.functional as F
from scdrugmap.extract.backbones.uce import UCE

F.layer_norm(F.gelu(F.linear(torch.randn(64, 8), torch.randn(8, 8))), (8,))     # kernels' one-time set-up

def status(key):                       # kB
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def growth(work):                      # peak RSS during work() above the RSS before it
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")          # resets the peak (VmHWM)
    out = work()
    return status("VmHWM") - base, out
X = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (4, 2000)).astype(np.float32))
class Source:
    name, n_cells = "rss", 4
    def symbols(self, upper=True): return np.array([f"G{i}" for i in range(2000)])
    def rows(self, lo, hi): return X[lo:hi]
def build():
    model = UCE(model_dir=sys.argv[1], batch_size=1, options={"min_cells": 0})
    return model, model.cell_tokenizer(Source())        # gathers the dataset's token rows
table, (model, tok) = growth(build)
forward, emb = growth(lambda: model.embed_block(X, tok))
control, _ = growth(lambda: torch.load(sys.argv[1] + "/4layer_model.torch", weights_only=True))
print(json.dumps({"table": table, "forward": forward, "control": control, "rows": model.table.shape[0],
                  "finite": bool(np.isfinite(emb).all())}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["rows"] < 2100
    assert result["control"] > 0.9 * table_bytes                  # the measurement sees a whole load
    assert result["table"] < table_bytes / 8, result             # about 27 MB: set-up, the rows read
    assert result["forward"] < table_bytes / 5, result


def test_bad_model_files(cli, model_files, pc9_small, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    before = snapshot(st)

    def offsets_without_human(p):
        with open(p, "wb") as f:
            pickle.dump({"mouse": 4}, f)

    cases = {
        "no_checkpoint": (lambda d: (d / CKPT).unlink(), "has no UCE checkpoint"),
        "several": (lambda d: (d / "33l_8ep_1024t_1280.torch").symlink_to(model_files / CKPT),
                    "several UCE checkpoints"),
        "no_csv": (lambda d: (d / "species_chrom.csv").unlink(),
                   "has no species_chrom.csv: download https://figshare.com/ndownloader/files/42706558"),
        "no_offsets": (lambda d: (d / "species_offsets.pkl").unlink(), "has no species_offsets.pkl"),
        "no_protein_embeddings": (lambda d: shutil.rmtree(d / "protein_embeddings"), "protein_embeddings.tar.gz"),
        "missing_key": (lambda d: edit_state(d, lambda s: s.pop("transformer_encoder.layers.1.norm2.bias")),
                        "1 missing (e.g. transformer_encoder.layers.1.norm2.bias)"),
        "unexpected_key": (lambda d: edit_state(d, lambda s: s.update({"module.cls.weight": torch.zeros(2)})),
                           "1 unexpected (e.g. module.cls.weight)"),
        "missized_head": (lambda d: edit_state(d, lambda s: s.update({"binary_decoder.3.weight": torch.zeros(2, 128)})),
                          "1 mis-sized (e.g. binary_decoder.3.weight"),
        "table_without_chromosomes": (lambda d: edit_state(d, lambda s: s.update(
            {"pe_embedding.weight": s["pe_embedding.weight"][:N_TOKENS]})), "mis-sized (e.g. pe_embedding.weight"),
        "not_a_state_dict": (lambda d: replace(d / CKPT, lambda p: p.write_bytes(b"no")), "cannot read"),
        "no_human_offset": (lambda d: replace(d / "species_offsets.pkl", offsets_without_human),
                            "no offset for species 'human'"),
        "csv_columns": (lambda d: replace(d / "species_chrom.csv", lambda p: p.write_text("gene_symbol,species\n")),
                        "lacks column(s) chromosome, start"),
        "token_table_width": (lambda d: replace(d / "all_tokens.torch", lambda p: torch.save(torch.zeros(10, 3), p)),
                              "is not a (tokens x 16) tensor"),
    }
    run = ("extract", "--store", st, "--backbone", "uce", "--quiet")
    for case, (edit, match) in cases.items():
        folder = clone(model_files, tmp_path / case)
        edit(folder)
        cli.fails(*run, "--model-dir", folder, match=match)
    for option, match in (("nlayers=33", "holds 2 layers"), ("species=dog", "UCE knows"),
                          ("padding_mask=none", "use proper or official"), ("checkpoint=nope.torch", "check --option")):
        cli.fails(*run, "--model-dir", model_files, "--option", option, match=match)
    cli.fails(*run, "--model-dir", tmp_path / "nowhere", match="is not a directory")
    assert snapshot(st) == before


def test_bad_datasets(cli, model_files, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (20, 50)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 10}, index=[f"c{i}" for i in range(20)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"FAKE{i}" for i in range(50)])).write_h5ad(tmp_path / "f.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "fake", "--label-col", "response")
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "norm", "--label-col", "response",
           "--values", "log1p")
    before = snapshot(st)
    run = ("extract", "--store", st, "--backbone", "uce", "--model-dir", model_files, "--quiet")
    cli.fails(*run, "--dataset", "fake", match="only 0 of 50 genes have a UCE protein embedding")
    cli.fails(*run, "--dataset", "norm", match="needs raw counts")
    assert snapshot(st) == before
