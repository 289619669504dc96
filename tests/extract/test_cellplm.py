"""CellPLM: official checkpoint layout (the real config and 19,374-gene list, shrunk sizes), random
weights, checked against plain-torch implementations of the official formulas written here."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import H5adSource, torchrun_extract, write_pc9_small
from conftest import SHARED, snapshot
from official_cellplm import RELEASE, SMALL, release_config, save_cellplm

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.extract.backbones.cellplm import (CellPLM, CellPLMConfig, GeneMatch, build_model,  # noqa: E402
                                                  batch_codes, cell_groups, flow_attention, match_genes,
                                                  official_groups, read_gene_map, read_rows, sparse_tensor)
from scdrugmap.store.store import Store  # noqa: E402

GENE_MAP = SHARED / "backbone_assets" / "geneformer" / "gene_name_id_dict.pkl"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_cellplm(tmp_path_factory.mktemp("cellplm") / "ckpt")


@pytest.fixture(scope="module")
def gene_map():
    if not GENE_MAP.exists():
        pytest.skip("gene_name_id_dict.pkl not found: the shared test data is expected at ../shared")
    return GENE_MAP


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=20)



Source = H5adSource


# ---- plain-torch reference of the official formulas (float64) ----------------------------------
def reference_flow_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, eps=1e-6):
    """layer/flowformer.py::Flow_Attention written out head by head, with the (cells x cells)
    attention matrix materialised instead of the official linear-time order of products."""
    q, k, v = torch.sigmoid(x @ wq.T + bq), torch.sigmoid(x @ wk.T + bk), x @ wv.T + bv
    n, d = x.shape
    dh = d // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[:, h * dh:(h + 1) * dh] for t in (q, k, v))
        incoming = 1 / ((qh + eps) @ (kh.sum(0) + eps))                 # per query cell
        outgoing = 1 / ((kh + eps) @ (qh.sum(0) + eps))                 # per key cell
        conserved_sink = (qh + eps) @ ((kh * outgoing[:, None]).sum(0) + eps)
        conserved_source = ((kh + eps) @ ((qh * incoming[:, None]).sum(0) + eps)).clamp(-1, 1)
        allocation = torch.sigmoid(conserved_sink * (n / n))
        competition = torch.softmax(conserved_source, 0) * n
        attention = (qh * incoming[:, None]) @ kh.T                      # cells x cells
        outs.append((attention @ (vh * competition[:, None])) * allocation[:, None])
    return torch.cat(outs, 1) @ wo.T + bo


def reference_embedding(state, cfg, dense_log1p):
    """The official embedding path from the raw state dict, dense, one batch (all rows)."""
    s = {k: v.double() for k, v in state.items()}
    d, heads = cfg["enc_hid"], cfg.get("enc_head", 8)
    h = dense_log1p @ s["embedder.feat_enc.emb"]
    h = F.relu(h @ s["embedder.extra_linear.0.weight"].T + s["embedder.extra_linear.0.bias"])
    h = F.group_norm(h, 4, s["embedder.extra_linear.3.weight"], s["embedder.extra_linear.3.bias"], 1e-5)
    for i in range(cfg["enc_layers"]):
        p = f"encoder.layers.{i}."
        a = F.layer_norm(h, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        h = h + reference_flow_attention(a, *(s[p + f"self_attn.{n}_projection.{w}"]
                                              for n in ("query", "key", "value", "out") for w in ("weight", "bias")),
                                         heads=heads)
        f = F.layer_norm(h, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        f = F.gelu(f @ s[p + "_ff_block.0.weight"].T + s[p + "_ff_block.0.bias"])
        h = h + f @ s[p + "_ff_block.3.weight"].T + s[p + "_ff_block.3.bias"]
    h = F.layer_norm(h, (d,), s["pre_latent_norm.norm.weight"], s["pre_latent_norm.norm.bias"])
    p = "latent.layers.1.inference."
    logits = h @ s[p + "inference_qyx.0.logits.weight"].T + s[p + "inference_qyx.0.logits.bias"]
    y = F.one_hot(logits.argmax(1), logits.shape[1]).double()
    hidden = F.relu(torch.cat([h, y], 1) @ s[p + "inference_qzyx.0.weight"].T + s[p + "inference_qzyx.0.bias"])
    return hidden @ s[p + "inference_qzyx.2.mu.weight"].T + s[p + "inference_qzyx.2.mu.bias"]


def load_state(folder):
    return torch.load(folder / f"{RELEASE}.best.ckpt", weights_only=True)["model_state_dict"]


# ---- tests ------------------------------------------------------------------------------------
def test_strict_load_of_the_official_key_layout(checkpoint, tmp_path):
    model = CellPLM(model_dir=checkpoint)
    state, cfg = load_state(checkpoint), release_config(**SMALL)
    ours = model.model.state_dict()
    assert model.dim == 32 and len(model.cfg.genes) == 19374 == len(cfg["gene_list"])
    for k, v in ours.items():                       # every weight used came from the checkpoint
        assert torch.equal(v, state[k]), k
    unused = set(state) - set(ours)                 # declared, never run
    assert {k.split(".")[0] for k in unused} == {"embedder", "latent", "decoder"}
    assert {k for k in unused if not k.startswith("decoder.")} == {
        "embedder.norm0.weight", "embedder.norm0.bias", "embedder.pe_enc.missing_pe", "embedder.pe_enc.pe_enc.weight",
        *(f"latent.layers.1.inference.{n}.{w}" for n in ("inference_qzyx.2.var", "y_mu", "y_var")
          for w in ("weight", "bias"))}
    assert "decoder.covariate_layers.0.batch.0.weight" in unused and state[
        "decoder.covariate_layers.0.batch.0.weight"].shape == (4, 32)
    # a checkpoint saved without the training model's decoder loads as well
    CellPLM(model_dir=save_cellplm(tmp_path / "no-decoder", decoder=False))


def test_preprocessing_by_hand():
    """4 source genes -> a 4-gene model list: one unknown ID, one ID twice."""
    genes = ("ENSG01", "ENSG02", "ENSG03", "ENSG04")
    ids = ["ENSG03", "ENSGXX", "ENSG01", "ENSG03"]
    counts = sp.csr_matrix(np.array([[1, 5, 3, 2], [0, 0, 0, 0], [7, 1, 0, 0]], dtype=np.float32))
    cols, idx = match_genes(ids, genes, first_only=False)          # Ensembl IDs: every matching column
    assert cols.tolist() == [0, 2, 3] and idx.tolist() == [2, 0, 2]
    x = GeneMatch(cols, idx, 4, {}).prepare(counts).toarray()
    l1p = np.log1p
    np.testing.assert_allclose(x, [[l1p(3), 0, l1p(1) + l1p(2), 0], [0, 0, 0, 0], [0, 0, l1p(7), 0]], rtol=1e-6)
    cols, idx = match_genes(ids, genes, first_only=True)           # mapped symbols: the first column only
    assert cols.tolist() == [0, 2] and idx.tolist() == [2, 0]
    x = GeneMatch(cols, idx, 4, {}).prepare(counts)
    np.testing.assert_allclose(x.toarray(), [[l1p(3), 0, l1p(1), 0], [0, 0, 0, 0], [0, 0, l1p(7), 0]], rtol=1e-6)
    # sparse projection = log1p(counts of the kept columns) @ the kept genes' embedding rows, densely
    emb = torch.randn(4, 6, dtype=torch.float32)
    dense = np.log1p(counts.toarray()[:, cols]) @ emb.numpy()[idx]
    np.testing.assert_allclose(torch.sparse.mm(sparse_tensor(x), emb).numpy(), dense, rtol=1e-5, atol=1e-6)


def test_gene_map_files(tmp_path, checkpoint):
    (tmp_path / "m.tsv").write_text("symbol\tensembl\nEGFR\tENSG00000146648.18\nTP53\tENSG00000141510\n")
    (tmp_path / "m.csv").write_text("EGFR,ENSG00000146648\nC1orf112,ENSG00000000460\n")
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump({"EGFR": "ENSG00000146648"}, f)
    assert read_gene_map(tmp_path / "m.tsv") == {"EGFR": "ENSG00000146648", "TP53": "ENSG00000141510"}
    assert read_gene_map(tmp_path / "m.csv") == {"EGFR": "ENSG00000146648", "C1orf112": "ENSG00000000460"}
    assert read_gene_map(tmp_path / "m.pkl") == {"EGFR": "ENSG00000146648"}
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(tmp_path / "m.csv")})

    class Symbols:
        name = "d"
        def ensembl_ids(self): return None
        def symbols(self, upper=True): return np.array(["C1ORF112", "EGFR", "NOPE", "egfr"])

    ids, facts = model.gene_ids(Symbols())
    assert ids.tolist() == ["ENSG00000000460", "ENSG00000146648", "", "ENSG00000146648"]   # case-insensitive 2nd try
    assert facts["gene_map"] == "m.csv" and facts["genes_mapped"] == 3
    assert facts["gene_map_sha256"] == hashlib.sha256((tmp_path / "m.csv").read_bytes()).hexdigest()
    match = model.matching(Symbols())
    assert match.cols.tolist() == [0, 1] and match.facts["genes_matched"] == 2            # 'egfr' again: dropped


def test_flow_attention_matches_the_formulas():
    torch.manual_seed(0)
    cfg = CellPLMConfig(genes=("G",), hid=16, layers=1, heads=4, latent=4, clusters=3, norm="groupnorm", pe=True,
                        dec_hid=4, dec_layers=2, out_dim=1, covariates=())
    attn = build_model(cfg).encoder.layers[0].self_attn
    for lin in (attn.query_projection, attn.key_projection, attn.value_projection, attn.out_projection):
        torch.nn.init.normal_(lin.weight, std=0.5)
        torch.nn.init.normal_(lin.bias, std=0.5)
    x = torch.randn(13, 16)
    with torch.inference_mode():
        ours = flow_attention(attn, x, heads=4)
    weights = [p.detach().double() for lin in (attn.query_projection, attn.key_projection, attn.value_projection,
                                      attn.out_projection) for p in (lin.weight, lin.bias)]
    ref = reference_flow_attention(x.double(), *weights, heads=4)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    # a cell's output depends on the other cells (attention across cells)
    y = x.clone()
    y[5] += 1
    with torch.inference_mode():
        assert not torch.allclose(flow_attention(attn, y, heads=4)[0], ours[0])


def test_cell_groups():
    """grouping=chunk: near-equal groups inside a store chunk."""
    assert [b - a for a, b in cell_groups(4096, 1000)] == [820, 819, 819, 819, 819]
    assert cell_groups(40, 4096) == [(0, 40)] and cell_groups(0, 10) == []
    assert cell_groups(7, 3) == [(0, 3), (3, 5), (5, 7)]                # no 1-cell tail
    assert cell_groups(12, 4) == [(0, 4), (4, 8), (8, 12)]


def official_rule(n, size, labels=None):
    """The official grouping written out here from its description (CellEmbeddingPipeline._inference
    over TranscriptomicDataset): one item per obs['batch'] value, the values in sorted order (missing
    ones last, as one value), an item's cells in dataset order; each item cut into slices of ``size``
    cells from its first, the last slice taking what is left."""
    if labels is None:
        labels = [0] * n
    missing = [i for i, v in enumerate(labels) if v is None or v != v]
    values = sorted({v for i, v in enumerate(labels) if i not in missing})
    items = [[i for i, v in enumerate(labels) if i not in missing and v == value] for value in values]
    items += [missing] if missing else []
    groups = []
    for cells in items:
        start = 0
        while start < len(cells):
            end = start + size if len(cells) - start >= size else len(cells)
            groups.append(cells[start:end])
            start = end
    return groups


@pytest.mark.parametrize("n, size", [(23, 5), (40, 15), (40, 10), (3, 4096), (1, 1), (0, 7), (4096, 1000)])
def test_official_groups_are_the_official_rule(n, size):
    groups = official_groups(n, size)
    assert [g.tolist() for g in groups.groups()] == official_rule(n, size)
    assert all(len(g) == size for g in groups.groups()[:-1])             # runs of size, the remainder last
    for lo in range(0, n, 3):                                             # the groups that hold rows lo..hi-1
        for hi in range(lo + 1, min(n, lo + 9) + 1):
            expect = [k for k, g in enumerate(groups.groups()) if ((g >= lo) & (g < hi)).any()]
            assert groups.overlapping(lo, hi).tolist() == expect


def test_official_groups_within_batch_values():
    rng = np.random.default_rng(0)
    labels = rng.choice(["p2", "p10", "p1"], size=37).tolist()
    for size in (1, 4, 5, 13, 100):
        groups = official_groups(37, size, labels)
        assert [g.tolist() for g in groups.groups()] == official_rule(37, size, labels)
        assert groups.values == 3
        for lo in range(0, 37, 4):
            expect = [k for k, g in enumerate(groups.groups()) if ((g >= lo) & (g < lo + 6)).any()]
            assert groups.overlapping(lo, lo + 6).tolist() == expect
    # sorted values (LabelEncoder's order), a value's cells in store order, runs from its first cell
    assert [g.tolist() for g in official_groups(7, 2, ["b", "a", "b", "a", "b", "a", "b"]).groups()] == \
        [[1, 3], [5], [0, 2], [4, 6]]
    # categorical, integer and missing values; the codes are those of the sorted values
    cat = pd.Categorical(["x", None, "y", "x", None], categories=["y", "x"])
    assert batch_codes(cat)[0].tolist() == [0, 2, 1, 0, 2] and batch_codes(cat)[1] == 3
    assert [g.tolist() for g in official_groups(5, 4, cat).groups()] == [[0, 3], [2], [1, 4]]
    assert [g.tolist() for g in official_groups(4, 4, pd.Series([3, 1, 3, 2])).groups()] == [[1], [3], [0, 2]]
    assert batch_codes(np.array([2.0, np.nan, 1.0]))[0].tolist() == [1, 2, 0]
    assert batch_codes(["a", 1, "a"])[1] == 2                              # mixed types: still a partition


def test_read_rows_of_a_group():
    X = sp.random(50, 9, density=0.3, format="csr", random_state=1)

    class Rows:
        def rows(self, lo, hi):
            assert 0 <= lo < hi <= 50
            return X[lo:hi]

    for rows in ([3, 4, 5], [0, 2, 3, 17, 18, 49], list(range(50)), [7]):
        for window in (1, 4, 4096):
            got = read_rows(Rows(), np.array(rows), window=window)
            assert got.has_canonical_format and (got != X[rows]).nnz == 0


def test_embedding_matches_reference_and_depends_on_its_batch(checkpoint, pc9_small, gene_map):
    source = Source(pc9_small)
    block = sp.csr_matrix(source.adata.X)
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(gene_map)})
    match = model.matching(source)
    state, cfg = load_state(checkpoint), release_config(**SMALL)
    dense = np.zeros((block.shape[0], len(cfg["gene_list"])))
    dense[:, match.gene_idx] = np.log1p(block.toarray()[:, match.cols])   # symbols route: no repeated gene
    whole = model.embed_block(block, match)                               # 40 cells <= 4096: one batch
    ref = reference_embedding(state, cfg, torch.from_numpy(dense)).numpy()
    np.testing.assert_allclose(whole, ref, atol=1e-4, rtol=1e-4)
    assert np.array_equal(model.embed_block(block, match), whole)        # rerun: identical
    model.batch_cells = 10                                                # 4 groups of consecutive rows
    tens = model.embed_block(block, match)
    np.testing.assert_allclose(tens[10:20], reference_embedding(state, cfg, torch.from_numpy(dense[10:20])).numpy(),
                               atol=1e-4, rtol=1e-4)
    assert np.abs(tens - whole).max() > 1e-3                              # the batch matters


def test_extract_on_real_pc9_cells(cli, checkpoint, pc9_small, gene_map, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--quiet",
            "--option", f"gene_map={gene_map}")
    out = cli.ok(*base).output
    assert "40 cells x 32 (float16)" in out
    X, cells = Store.open(st).load("cellplm")
    assert X.shape == (40, 32) and X.dtype == np.float16 and np.isfinite(X).all() and len(cells) == 40
    prov = Store.open(st).provenance("cellplm").iloc[0]
    params = json.loads(prov["params"])
    assert params["batch_cells"] == 4096 and params["order"] == "store order"
    assert params["grouping"] == "official" and params["batch_col"] == "batch"      # the default grouping
    assert params["batch_col_used"] is False and params["batch_values"] is None and params["groups"] == 1
    assert params["latent"] == "GMVAE mean, argmax cluster" and params["checkpoint"] == RELEASE
    assert params["gene_map"] == "gene_name_id_dict.pkl"
    assert params["gene_map_sha256"] == hashlib.sha256(gene_map.read_bytes()).hexdigest()
    with open(gene_map, "rb") as f:
        names = pickle.load(f)
    folded = {}
    for symbol, ensembl in names.items():
        folded.setdefault(symbol.upper(), ensembl)
    found = [names.get(s) or folded.get(s.upper(), "") for s in Source(pc9_small).symbols()]
    assert params["genes_matched"] == len(set(found) & set(release_config(**SMALL)["gene_list"])) > 10_000
    assert int(prov["chunk_rows"]) == 4096
    assert len(prov["checkpoint_sha256"]) == 64
    # the stored values are the backbone's
    source = Source(pc9_small)
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(gene_map)})
    direct = model.embed_block(sp.csr_matrix(source.adata.X), model.matching(source))
    np.testing.assert_allclose(X.astype(np.float32), direct, atol=1e-2, rtol=1e-2)
    # deterministic: a forced rerun stores the same bytes
    cli.ok(*base, "--force")
    assert np.array_equal(Store.open(st).load("cellplm")[0], X)
    # another batch size: other embeddings, and provenance says so; --batch-size means the same
    cli.ok(*base, "--force", "--option", "batch_cells=7")
    X7 = Store.open(st).load("cellplm")[0]
    assert json.loads(Store.open(st).provenance("cellplm").iloc[0]["params"])["batch_cells"] == 7
    assert np.abs(X7.astype(np.float32) - X.astype(np.float32)).max() > 1e-2
    cli.ok(*base, "--force", "--batch-size", "7")
    assert np.array_equal(Store.open(st).load("cellplm")[0], X7)


def _direct(model, source, groups, complete=True):
    """Store rows embedded with each group (row indices) as one forward pass; ``complete``: the
    groups hold every row."""
    match = model.matching(source)
    X = sp.csr_matrix(source.adata.X)
    out = np.full((X.shape[0], model.dim), np.nan, dtype=np.float32)
    for g in groups:
        out[g] = model.forward(match.prepare(X[g]))
    assert not (complete and np.isnan(out).any())
    return out


def _dense_log1p(model, source):
    match = model.matching(source)
    block = sp.csr_matrix(source.adata.X)
    dense = np.zeros((block.shape[0], len(model.cfg.genes)))
    dense[:, match.gene_idx] = np.log1p(block.toarray()[:, match.cols])   # symbols route: no repeated gene
    return dense


def _params(st):
    prov = Store.open(st).provenance("cellplm").iloc[0]
    return json.loads(prov["params"]), int(prov["chunk_rows"])


def test_default_grouping_spans_store_chunks(cli, checkpoint, pc9_small, gene_map, tmp_path):
    """40 cells in runs of 15 (the last of 10) written in chunks of 7: groups cross chunk
    boundaries, and the embeddings are those of the official groups whatever the chunk size."""
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--quiet",
            "--option", f"gene_map={gene_map}", "--option", "batch_cells=15", "--dtype", "float32")
    cli.ok(*base, "--chunk-rows", "7")
    X = Store.open(st).load("cellplm")[0]
    params, chunk_rows = _params(st)
    assert chunk_rows == 7 and params["grouping"] == "official" and params["batch_cells"] == 15
    assert params["batch_col"] == "batch" and params["batch_col_used"] is False and params["groups"] == 3
    source = Source(pc9_small)
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(gene_map), "batch_cells": 15})
    groups = official_rule(40, 15)
    assert [len(g) for g in groups] == [15, 15, 10]
    np.testing.assert_array_equal(X, _direct(model, source, groups))
    state, cfg, dense = load_state(checkpoint), release_config(**SMALL), _dense_log1p(model, source)
    for g in groups:                                                      # the official formulas, group by group
        ref = reference_embedding(state, cfg, torch.from_numpy(dense[g])).numpy()
        np.testing.assert_allclose(X[g], ref, atol=1e-4, rtol=1e-4)
    # the chunk size changes nothing (one chunk, chunks of 16, of one row); reruns are byte-identical
    for chunk in ("4096", "16", "1", "7"):
        cli.ok(*base, "--force", "--chunk-rows", chunk)
        assert np.array_equal(Store.open(st).load("cellplm")[0], X), chunk
    # it is not the chunk scheme: near-equal groups inside 7-row chunks give other embeddings
    by_chunk = [list(range(c + a, c + b)) for c in range(0, 40, 7) for a, b in cell_groups(min(7, 40 - c), 15)]
    assert np.abs(_direct(model, source, by_chunk) - X).max() > 1e-3
    # the encoder: each group computed once when the chunks come in order; any order, any chunking
    # gives the same rows
    encode = model.encoder(source)
    assert np.array_equal(np.concatenate([model.embed_rows(source, encode, lo, min(lo + 7, 40))
                                          for lo in range(0, 40, 7)]), X)
    assert encode.computed == 3 and not encode.kept
    shuffled = model.encoder(source)
    for lo, hi in [(33, 40), (14, 16), (0, 14), (16, 33)]:
        assert np.array_equal(model.embed_rows(source, shuffled, lo, hi), X[lo:hi])
    # a block given directly is a dataset of its own: runs of 15 from its first row
    runs_of_block = _direct(model, source, [list(range(10, 25)), list(range(25, 40))], complete=False)
    np.testing.assert_array_equal(encode(sp.csr_matrix(source.adata.X[10:40])), runs_of_block[10:40])


def test_grouping_chunk_keeps_the_old_scheme(cli, checkpoint, pc9_small, gene_map, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--quiet",
            "--option", f"gene_map={gene_map}", "--option", "batch_cells=7", "--option", "grouping=chunk",
            "--dtype", "float32")
    cli.ok(*base, "--chunk-rows", "16")
    X = Store.open(st).load("cellplm")[0]
    params, chunk_rows = _params(st)
    assert chunk_rows == 16 and params["grouping"] == "chunk" and params["batch_cells"] == 7
    assert params["batch_col"] is None and "batch_col_used" not in params and "near-equal" in params["batching"]
    source = Source(pc9_small)
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(gene_map)})
    # chunks of 16, 16 and 8 rows, each cut into ceil(rows / 7) near-equal groups: 6+5+5, 6+5+5, 4+4
    groups = [list(range(c + a, c + b)) for c in (0, 16, 32) for a, b in cell_groups(min(16, 40 - c), 7)]
    assert [len(g) for g in groups] == [6, 5, 5, 6, 5, 5, 4, 4]
    np.testing.assert_array_equal(X, _direct(model, source, groups))
    cli.ok(*base, "--force", "--chunk-rows", "16")                          # deterministic
    assert np.array_equal(Store.open(st).load("cellplm")[0], X)
    cli.ok(*base, "--force")                                                # one chunk: other groups (6 x 6 + 4)
    X1 = Store.open(st).load("cellplm")[0]
    np.testing.assert_array_equal(X1, _direct(model, source, [list(range(a, b)) for a, b in cell_groups(40, 7)]))
    assert np.abs(X1 - X).max() > 1e-3
    # and the default differs from it: runs of 7 with a remainder of 5
    cli.ok(*base[:-4], "--dtype", "float32", "--force", "--chunk-rows", "16")
    assert _params(st)[0]["grouping"] == "official"
    np.testing.assert_array_equal(Store.open(st).load("cellplm")[0], _direct(model, source, official_rule(40, 7)))
    before = snapshot(st)
    cli.fails(*base, "--force", "--option", "batch_col=batch", match="applies to grouping=official")
    cli.fails(*base[:-4], "--force", "--option", "grouping=random", match="grouping=random: use official")
    assert snapshot(st) == before


def test_batch_column_is_honoured(cli, checkpoint, pc9_small, gene_map, tmp_path):
    """obs['batch'] as the official code reads it: runs of batch_cells within each value."""
    a = ad.read_h5ad(pc9_small)
    labels = np.array(["s2", "s1", "s3"], dtype=object)[np.random.default_rng(3).integers(0, 3, a.n_obs)]
    labels[[5, 6, 30]] = None                                                  # missing: a value of their own
    a.obs["batch"] = pd.Categorical(labels)
    a.write_h5ad(tmp_path / "batched.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "batched.h5ad", "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--quiet",
            "--option", f"gene_map={gene_map}", "--option", "batch_cells=6", "--dtype", "float32")
    cli.ok(*base, "--chunk-rows", "7")
    X = Store.open(st).load("cellplm")[0]
    groups = official_rule(a.n_obs, 6, labels.tolist())
    assert sorted(sum(groups, [])) == list(range(40)) and any(g[-1] - g[0] >= 7 for g in groups)   # across chunks
    params, _ = _params(st)
    assert params["batch_col"] == "batch" and params["batch_col_used"] is True and params["batch_values"] == 4
    assert params["groups"] == len(groups)
    source = Source(tmp_path / "batched.h5ad")
    model = CellPLM(model_dir=checkpoint, options={"gene_map": str(gene_map), "batch_cells": 6})
    np.testing.assert_array_equal(X, _direct(model, source, groups))
    cli.ok(*base, "--force")                                                 # one chunk: the same bytes
    assert np.array_equal(Store.open(st).load("cellplm")[0], X)
    # batch_col= : the column is ignored, runs over the whole dataset
    cli.ok(*base, "--force", "--chunk-rows", "7", "--option", "batch_col=")
    params, _ = _params(st)
    assert params["batch_col"] is None and params["batch_col_used"] is False and params["groups"] == 7
    np.testing.assert_array_equal(Store.open(st).load("cellplm")[0], _direct(model, source, official_rule(40, 6)))
    # another column, named explicitly: used when there, refused when not
    cli.ok(*base, "--force", "--chunk-rows", "7", "--option", "batch_col=response")
    assert _params(st)[0]["batch_values"] == 2
    np.testing.assert_array_equal(Store.open(st).load("cellplm")[0],
                                  _direct(model, source, official_rule(40, 6, a.obs["response"].tolist())))
    before = snapshot(st)
    cli.fails(*base, "--force", "--option", "batch_col=donor", match="has no obs column 'donor'")
    assert snapshot(st) == before


def test_two_processes_under_torchrun_give_the_same_groups(cli, checkpoint, pc9_small, gene_map, tmp_path):
    """Two ranks, each with half of the 7-row chunks: the group of rows 15-29 straddles the ranks'
    shares, and the stored bytes are those of one process writing one chunk."""
    args = ["--backbone", "cellplm", "--model-dir", str(checkpoint), "--option", f"gene_map={gene_map}",
            "--option", "batch_cells=15", "--quiet"]
    for name in ("one", "two"):
        cli.ok("ingest", pc9_small, "--store", tmp_path / name, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", tmp_path / "one", *args)
    run = torchrun_extract(tmp_path / "two", *args, "--chunk-rows", "7")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1 of 2: cellplm · pc9: computed 3 chunks" in run.stderr
    one, two = Store.open(tmp_path / "one"), Store.open(tmp_path / "two")
    assert np.array_equal(one.load("cellplm")[0], two.load("cellplm")[0])
    assert one.provenance("cellplm").iloc[0]["params"] == two.provenance("cellplm").iloc[0]["params"]


def test_benchmark_compares_the_same_groups(checkpoint, pc9_small, gene_map):
    """extract_bench's device-vs-CPU check gives the CPU model the device model's batch, so CellPLM's
    figures are precision alone: here both sides are the CPU in fp32, hence identical."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import extract_bench

    source = Source(pc9_small)
    options = {"gene_map": str(gene_map)}
    model = CellPLM(model_dir=checkpoint, batch_size=12, options=options)
    facts = extract_bench.agreement(CellPLM, checkpoint, options, source, model.encoder(source), 40, model.batch_size)
    assert facts == {"cpu_fp32_min_cosine": 1.0, "cpu_fp32_max_rel_err": 0.0, "cpu_check_batch": 12}
    # the batch matters: a CPU run in batches of 8 (what the check used before) is another embedding
    eights = CellPLM(model_dir=checkpoint, batch_size=8, options=options)
    assert np.abs(eights.encoder(source)(source.rows(0, 40)) - model.encoder(source)(source.rows(0, 40))).max() > 1e-3


def test_gene_map_found_in_model_dir(cli, checkpoint, pc9_small, gene_map, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    shutil.copy(gene_map, folder / gene_map.name)
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "cellplm", "--model-dir", folder, "--quiet")
    assert json.loads(Store.open(st).provenance("cellplm").iloc[0]["params"])["gene_map"] == gene_map.name
    shutil.copy(gene_map, folder / "gene_name_id_dict_v2.pkl")
    cli.fails("extract", "--store", st, "--backbone", "cellplm", "--model-dir", folder, "--quiet", "--force",
              match="several gene maps")


def _edit_state(folder, edit):
    path = folder / f"{RELEASE}.best.ckpt"
    state = torch.load(path, weights_only=True)["model_state_dict"]
    edit(state)
    torch.save({"model_state_dict": state}, path)


def _edit_config(folder, **changes):
    path = folder / f"{RELEASE}.config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


BAD_CHECKPOINTS = {
    "no_ckpt": (lambda d: (d / f"{RELEASE}.best.ckpt").unlink(), f"but no {RELEASE}.best.ckpt"),
    "no_config": (lambda d: (d / f"{RELEASE}.config.json").unlink(), f"but no {RELEASE}.config.json"),
    "empty": (lambda d: [p.unlink() for p in d.iterdir()], "no CellPLM checkpoint"),
    "several": (lambda d: [shutil.copy(p, d / p.name.replace(RELEASE, "other")) for p in list(d.iterdir())],
                "several CellPLM checkpoints"),
    "missing_key": (lambda d: _edit_state(d, lambda s: s.pop("encoder.layers.1.norm2.bias")),
                    "1 missing (e.g. encoder.layers.1.norm2.bias)"),
    "unexpected_key": (lambda d: _edit_state(d, lambda s: s.update({"module.head.weight": torch.zeros(2)})),
                       "1 unexpected (e.g. module.head.weight)"),
    "partial_decoder": (lambda d: _edit_state(d, lambda s: s.pop("decoder.out_layer.dec_disp")), "missing"),
    "missized": (lambda d: _edit_config(d, post_latent_dim=16), "mis-sized"),
    "more_layers": (lambda d: _edit_config(d, enc_layers=3), "strict loading"),
    "not_a_ckpt": (lambda d: (d / f"{RELEASE}.best.ckpt").write_bytes(b"not a checkpoint"), "cannot read"),
    "no_state_dict": (lambda d: torch.save({"state_dict": {}}, d / f"{RELEASE}.best.ckpt"), "no model_state_dict"),
    "other_architecture": (lambda d: _edit_config(d, enc_mod="performer"), "not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints(cli, checkpoint, pc9_small, gene_map, tmp_path, case):
    edit, match = BAD_CHECKPOINTS[case]
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    edit(bad)
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "cellplm", "--model-dir", bad, "--quiet",
              "--option", f"gene_map={gene_map}", match=match)
    assert snapshot(st) == before


def test_bad_datasets_and_options(cli, checkpoint, gene_map, pc9_small, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (20, 50)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 10}, index=[f"c{i}" for i in range(20)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"FAKE{i}" for i in range(50)])).write_h5ad(tmp_path / "f.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "fake", "--label-col", "response")
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "norm", "--label-col", "response",
           "--values", "log1p")
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    before = snapshot(st)
    run = ("extract", "--store", st, "--backbone", "cellplm", "--model-dir", checkpoint, "--quiet")
    cli.fails(*run, "--dataset", "pc9", match="has gene symbols only")           # no map given or found
    cli.fails(*run, "--dataset", "fake", "--option", f"gene_map={gene_map}", match="are in the CellPLM gene list")
    cli.fails(*run, "--dataset", "norm", "--option", f"gene_map={gene_map}", match="needs raw counts")
    cli.fails(*run, "--dataset", "pc9", "--option", f"gene_map={tmp_path / 'none.tsv'}", match="no such file")
    cli.fails(*run, "--dataset", "pc9", "--option", f"gene_map={gene_map}", "--batch-size", "5",
              "--option", "batch_cells=7", match="disagree")
    cli.fails(*run, "--dataset", "pc9", "--option", "name=nope", match="check --option name=nope")
    assert snapshot(st) == before
