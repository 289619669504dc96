"""scBERT: official checkpoint layout (random weights, small sizes, real file names), hand-checked
preprocessing, a float64 reference forward of the official formulas, and the CLI on real PC9 cells."""

from __future__ import annotations

import hashlib
import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import H5adSource, write_pc9_small
from conftest import snapshot
from official_performer import (SCBERT_CKPT, SCBERT_G2V, SCBERT_GENES, pc9_gene_order, reference_forward,
                                save_scbert)

torch = pytest.importorskip("torch")

from scdrugmap.extract.backbones.scbert import ReferenceBinTokenizer, ScBERT  # noqa: E402
from scdrugmap.extract.performer import GeneMatch, log2_normalised  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def genes():
    return pc9_gene_order()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, genes):
    return save_scbert(tmp_path_factory.mktemp("scbert") / "ckpt", genes)


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=20)



Source = H5adSource


def load_state(folder):
    return torch.load(folder / SCBERT_CKPT, weights_only=True)["model_state_dict"]


def tokens_by_hand(counts: np.ndarray, symbols, genes, cap=5) -> np.ndarray:
    """preprocess.py + predict.py in float64: reorder/zero-fill, normalise to 1e4, log2(1+x), clip, floor, append 0."""
    first = {}
    for c, s in enumerate(symbols):
        first.setdefault(s, c)
    dense = np.zeros((counts.shape[0], len(genes)))
    for i, g in enumerate(genes):
        if g in first:
            dense[:, i] = counts[:, first[g]]
    total = dense.sum(1, keepdims=True)
    x = np.log2(1 + dense * 1e4 / np.where(total > 0, total, 1))
    return np.hstack([np.floor(np.minimum(x, cap)), np.zeros((len(x), 1))]).astype(np.int64)


# ---- tests -------------------------------------------------------------------------------------
def test_strict_load_of_the_official_layout(checkpoint, genes):
    model = ScBERT(model_dir=checkpoint)
    state = load_state(checkpoint)
    ours = model.model.state_dict()
    assert set(ours) == set(state) and len(state) == 2 + 1 + 2 * 14 + 4
    for k, v in ours.items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    assert ours["pos_emb.emb.weight"].dtype == torch.float64
    assert model.genes == tuple(genes) and model.dim == 16 and model.cap == 5
    assert (model.sizes.heads, model.sizes.depth, model.sizes.nb_features, model.sizes.pos_rows) == (2, 2, 266, 371)
    # the gene2vec file is not needed: its values are already the checkpoint's pos_emb (plus the zero row)
    g2v = np.load(checkpoint / SCBERT_G2V)
    assert np.array_equal(state["pos_emb.emb.weight"][:-1].numpy(), g2v.astype(np.float64))
    assert not state["pos_emb.emb.weight"][-1].any()


def test_preprocessing_by_hand():
    genes = ["G0", "G1", "G2", "G3", "G4"]
    symbols = ["G3", "G1", "g1", "G9", "G1", "G4"]            # 'g1' is not G1; the second G1 is not read
    counts = np.array([[3, 1, 500, 700, 9, 9996],             # total over reference genes 10,000
                       [0, 1, 0, 0, 0, 19999],                # x = 0.5 -> bin 0
                       [0, 0, 0, 0, 0, 0],                    # an empty cell is kept
                       [10, 0, 1000, 5, 0, 9990]], dtype=np.float32)
    match = GeneMatch.build(symbols, genes, "toy", "scBERT")
    assert match.matched == 3 and match.source_genes == 6
    tok = ReferenceBinTokenizer(match.select, cap=5)
    values = tok.prepare(sp.csr_matrix(counts))
    expected_x = {(0, 1): 1.0, (0, 3): 3.0, (0, 4): 9996.0, (1, 1): 0.5, (1, 4): 9999.5, (3, 3): 10.0, (3, 4): 9990.0}
    dense = values.toarray()
    assert {tuple(ij) for ij in np.argwhere(dense)} == set(expected_x)
    for (i, j), x in expected_x.items():
        assert dense[i, j] == pytest.approx(np.log2(1 + x), rel=1e-6)
    assert dense[0, 1] == 1.0 and dense[0, 3] == 2.0               # exact bin edges stay exact in float32
    ids = np.array([tok.tokens(values, i) for i in range(4)])
    assert ids.tolist() == [[0, 1, 0, 2, 5, 0], [0, 0, 0, 0, 5, 0], [0] * 6, [0, 0, 0, 3, 5, 0]]
    assert tok.lengths(values).tolist() == [6] * 4                # 5 genes + the appended token
    assert np.array_equal(ids, tokens_by_hand(counts, symbols, genes))


def test_normalisation_uses_the_reference_genes_only():
    select = GeneMatch.build(["A", "B", "C"], ["B", "A"], "toy", "scBERT").select
    x = log2_normalised(sp.csr_matrix(np.array([[1.0, 3.0, 1000.0]])), select).toarray()   # C is not counted
    np.testing.assert_allclose(x, np.log2(1 + np.array([[7500.0, 2500.0]])), rtol=1e-6)


def test_embedding_matches_the_official_forward_cell_by_cell(checkpoint, pc9_small, genes):
    source = Source(pc9_small)
    model = ScBERT(model_dir=checkpoint)
    tok = model.cell_tokenizer(source)
    X = sp.csr_matrix(source.adata.X)[:6]
    values = tok.prepare(X)
    ids = np.array([tok.tokens(values, i) for i in range(6)])
    assert np.array_equal(ids, tokens_by_hand(X.toarray(), source.symbols(), genes))
    assert len(np.unique(ids)) == 6                                # bins 0..5 all occur on PC9
    ours = model.embed_block(X, tok)
    state = load_state(checkpoint)
    ids_t = torch.from_numpy(ids)
    positions = torch.arange(ids.shape[1]).expand(6, -1)
    per_cell = np.vstack([reference_forward(state, ids_t[i:i + 1], positions[i:i + 1], heads=2)[:, :-1].mean(1).numpy()
                          for i in range(6)])                     # predict.py: one cell per batch
    np.testing.assert_allclose(ours, per_cell, rtol=1e-4, atol=1e-5)
    # the official batched run (one key maximum over 6 cells) is close but not equal: the deviation we avoid
    batched = reference_forward(state, ids_t, positions, heads=2)[:, :-1].mean(1).numpy()
    gap = np.abs(batched - per_cell).max()
    assert 0 < gap < 1e-2 * np.abs(per_cell).max()
    # batch size and order do not matter
    model.batch_size = 1
    np.testing.assert_allclose(model.embed_block(X, tok), ours, rtol=1e-5, atol=1e-6)
    model.batch_size = 4
    order = np.array([5, 2, 0, 4, 1, 3])
    np.testing.assert_allclose(model.embed_block(X[order], tok), ours[order], rtol=1e-5, atol=1e-6)


def test_key_max_batch_is_the_official_batched_run(checkpoint, pc9_small, genes):
    """--option key_max=batch: finetune.py's batches of 3 (consecutive cells, one key maximum each)."""
    source = Source(pc9_small)
    model = ScBERT(model_dir=checkpoint, batch_size=3, options={"key_max": "batch"})
    tok = model.cell_tokenizer(source)
    X = sp.csr_matrix(source.adata.X)[:6]
    ours = model.embed_block(X, tok)
    ids = torch.from_numpy(tokens_by_hand(X.toarray(), source.symbols(), genes))
    positions = torch.arange(ids.shape[1]).expand(6, -1)
    state = load_state(checkpoint)
    official = np.vstack([reference_forward(state, ids[b], positions[b], heads=2)[:, :-1].mean(1).numpy()
                          for b in (slice(0, 3), slice(3, 6))])
    np.testing.assert_allclose(ours, official, rtol=1e-4, atol=1e-5)
    per_cell = ScBERT(model_dir=checkpoint, batch_size=3).embed_block(X, tok)
    assert np.abs(ours - per_cell).max() > 5e-4                        # (the match above is to ~1e-6)
    alone = ScBERT(model_dir=checkpoint, batch_size=1, options={"key_max": "batch"}).embed_block(X, tok)
    assert np.array_equal(alone, ScBERT(model_dir=checkpoint, batch_size=1).embed_block(X, tok))
    params = model.params()
    assert params["key_max"].startswith("per batch") and params["batching"].startswith("store order: cells [0, 3)")


def test_extract_on_real_pc9_cells(cli, checkpoint, pc9_small, genes, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    base = ("extract", "--store", st, "--backbone", "scbert", "--model-dir", checkpoint, "--quiet")
    assert "40 cells x 16 (float16)" in cli.ok(*base).output
    X, cells = Store.open(st).load("scbert")
    assert X.shape == (40, 16) and np.isfinite(X).all() and len(cells) == 40
    prov = Store.open(st).provenance("scbert").iloc[0]
    params = json.loads(prov["params"])
    in_pc9 = set(Source(pc9_small).symbols())
    assert params["genes_matched"] == sum(g in in_pc9 for g in genes) == 350 and params["reference_genes"] == 370
    assert params["checkpoint"] == SCBERT_CKPT and params["gene_list"] == SCBERT_GENES
    assert params["gene_list_sha256"] == hashlib.sha256((checkpoint / SCBERT_GENES).read_bytes()).hexdigest()
    assert params["pooling"].startswith("mean over the gene positions") and "excluded" in params["pooling"]
    assert params["key_max"].startswith("per cell") and params["cells_filtered"].startswith("none")
    assert params["batch_size"] == 4 and params["precision"] == "fp32" and params["model_nb_features"] == 266
    assert prov["checkpoint_sha256"] == hashlib.sha256((checkpoint / SCBERT_CKPT).read_bytes()).hexdigest()
    source = Source(pc9_small)
    model = ScBERT(model_dir=checkpoint)
    direct = model.embed_block(sp.csr_matrix(source.adata.X), model.cell_tokenizer(source))
    np.testing.assert_allclose(X.astype(np.float32), direct, atol=2e-3, rtol=2e-3)
    cli.ok(*base, "--force")                                       # deterministic
    assert np.array_equal(Store.open(st).load("scbert")[0], X)
    cli.ok(*base, "--force", "--batch-size", "1")                  # batch-size invariant
    np.testing.assert_allclose(Store.open(st).load("scbert")[0].astype(np.float32), X.astype(np.float32), atol=1e-3)


def test_gene_list_as_text(cli, genes, pc9_small, tmp_path):
    h5ad = save_scbert(tmp_path / "h5ad", genes)
    text = save_scbert(tmp_path / "text", genes, gene_list="txt")          # gene_list.txt in --model-dir
    bare = save_scbert(tmp_path / "bare", genes, gene_list=None)
    (tmp_path / "order.txt").write_text("\n".join(genes) + "\n")
    source = Source(pc9_small)
    X = sp.csr_matrix(source.adata.X)[:3]
    ref = ScBERT(model_dir=h5ad)
    want = ref.embed_block(X, ref.cell_tokenizer(source))
    for model in (ScBERT(model_dir=text), ScBERT(model_dir=bare, options={"gene_list": str(tmp_path / "order.txt")})):
        assert model.genes == tuple(genes)
        assert np.array_equal(model.embed_block(X, model.cell_tokenizer(source)), want)


def test_a_checkpoint_that_needs_unpickling(cli, checkpoint, pc9_small, tmp_path):
    """weights_only refuses pickled objects beside the weights; trust_checkpoint=true reads them."""
    import fractions

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    torch.save({"model_state_dict": load_state(checkpoint), "losses": fractions.Fraction(1, 3)}, folder / SCBERT_CKPT)
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    run = ("extract", "--store", st, "--backbone", "scbert", "--model-dir", folder, "--quiet")
    before = snapshot(st)
    cli.fails(*run, match="pass --option trust_checkpoint=true")
    assert snapshot(st) == before
    cli.ok(*run, "--option", "trust_checkpoint=true")
    assert json.loads(Store.open(st).provenance("scbert").iloc[0]["params"])["trust_checkpoint"] is True


def _edit_state(folder, edit):
    state = torch.load(folder / SCBERT_CKPT, weights_only=True)["model_state_dict"]
    edit(state)
    torch.save({"model_state_dict": state}, folder / SCBERT_CKPT)


def _finetuned_head(state):
    """finetune.py replaces to_out by its Identity head (conv1, fc1..fc3)."""
    del state["to_out.weight"], state["to_out.bias"]
    state.update({"to_out.conv1.weight": torch.zeros(1, 1, 1, 16), "to_out.conv1.bias": torch.zeros(1),
                  "to_out.fc1.weight": torch.zeros(512, 371), "to_out.fc1.bias": torch.zeros(512)})


BAD = {
    "no_checkpoint": (lambda d: (d / SCBERT_CKPT).unlink(), "no scBERT checkpoint (*.pth)"),
    "several_checkpoints": (lambda d: shutil.copy(d / SCBERT_CKPT, d / "panglao_pretrained.pth"),
                            "several scBERT checkpoints"),
    "no_gene_list": (lambda d: (d / SCBERT_GENES).unlink(), "no scBERT gene list"),
    "several_gene_lists": (lambda d: (d / "gene_list.txt").write_text("A\n"), "several scBERT gene lists"),
    "short_gene_list": (lambda d: ((d / SCBERT_GENES).unlink(), (d / "gene_list.txt").write_text("A\nB\n")),
                        "has 2 genes but the checkpoint's positional table has 371 rows"),
    "missing_key": (lambda d: _edit_state(d, lambda s: s.pop("performer.net.layers.1.1.fn.fn.w2.bias")),
                    "1 missing (e.g. performer.net.layers.1.1.fn.fn.w2.bias)"),
    "unexpected_key": (lambda d: _edit_state(d, lambda s: s.update({"module.extra": torch.zeros(2)})),
                       "1 unexpected (e.g. module.extra)"),
    "missized": (lambda d: _edit_state(d, lambda s: s.update({"performer.net.layers.0.0.fn.to_k.weight":
                                                              torch.zeros(64, 16)})), "1 mis-sized"),
    "finetuned": (lambda d: _edit_state(d, _finetuned_head), "2 missing (e.g. to_out.weight, to_out.bias)"),
    "not_a_checkpoint": (lambda d: (d / SCBERT_CKPT).write_bytes(b"junk"), "cannot read"),
    "no_state_dict": (lambda d: torch.save({"state_dict": {"a": torch.zeros(1)}}, d / SCBERT_CKPT),
                      "no model_state_dict"),
    "not_a_performer": (lambda d: torch.save({"model_state_dict": {"a": torch.zeros(1)}}, d / SCBERT_CKPT),
                        "lacks token_emb.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files(cli, checkpoint, pc9_small, tmp_path, case):
    edit, match = BAD[case]
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    edit(bad)
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scbert", "--model-dir", bad, "--quiet", match=match)
    assert snapshot(st) == before


def test_bad_datasets_and_options(cli, checkpoint, pc9_small, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (20, 50)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 10}, index=[f"c{i}" for i in range(20)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"FAKE{i}" for i in range(50)])).write_h5ad(tmp_path / "f.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "fake", "--label-col", "response")
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "norm", "--label-col", "response", "--values", "log1p")
    before = snapshot(st)
    run = ("extract", "--store", st, "--backbone", "scbert", "--quiet")
    cli.fails(*run, "--model-dir", checkpoint, "--dataset", "fake", match="only 0 of the scBERT model's 370 genes")
    cli.fails(*run, "--model-dir", checkpoint, "--dataset", "norm", match="needs raw counts")
    cli.fails(*run, "--model-dir", checkpoint, "--dataset", "fake", "--option", f"gene_list={tmp_path / 'none.txt'}",
              match="no such file")
    cli.fails(*run, "--model-dir", checkpoint / SCBERT_CKPT, "--dataset", "fake", match="is not a directory")
    cli.fails(*run, "--dataset", "fake", match="needs weights")
    assert snapshot(st) == before
