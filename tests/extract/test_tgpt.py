"""tGPT: random GPT-2 weights saved with the real release tokenizer."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import save_tgpt
from conftest import snapshot

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scdrugmap.extract.backbones.tgpt import RankedSymbolTokenizer, clean_symbol  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tgpt(tmp_path_factory.mktemp("tgpt") / "tgpt", n_embd=64, n_layer=2, n_head=4)


def test_ranked_symbols_by_hand():
    assert clean_symbol("HLA-B") == "HLA_B" and clean_symbol("RP11-34P13.7") == "RP11_34P13_7"
    tok = RankedSymbolTokenizer(cols=np.array([0, 2, 3]), ids=np.array([10, 12, 13]), n_genes=2, bos_id=1, eos_id=2)
    counts = sp.csr_matrix(np.array([[1, 9, 5, 5],      # col 1 not in vocabulary; 5 = 5 tie -> col 2 first
                                     [0, 3, 0, 0],
                                     [2, 0, 0, 7]], dtype=float))
    values = tok.prepare(counts)
    assert tok.tokens(values, 0).tolist() == [1, 12, 13, 2]
    assert tok.tokens(values, 1).tolist() == [1, 2]
    assert tok.tokens(values, 2).tolist() == [1, 13, 10, 2]
    assert tok.lengths(values).tolist() == [4, 2, 4]


def test_extract_on_real_pc9(cli, checkpoint, pc9, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", st, "--dataset", "pc9", "--label-col", "response")
    out = cli.ok("extract", "--store", st, "--backbone", "tgpt", "--model-dir", checkpoint, "--quiet").output
    assert "1,505 cells x 64 (float16)" in out
    s = Store.open(st)
    X, _ = s.load("tgpt")
    assert X.shape == (1505, 64) and np.isfinite(X).all()
    params = json.loads(s.provenance("tgpt")["params"][0])
    assert params["max_length"] == 64 and params["genes_in_vocabulary"] == 14071   # PC9 symbols in vocab
    # the pooled vector equals a manual forward of the official-format input of one cell
    from scdrugmap.extract.backbones.tgpt import TGPT

    model = TGPT(model_dir=checkpoint)
    a = ad.read_h5ad(pc9)
    row = np.asarray(a.X[7].todense()).ravel()
    in_vocab = [(c, clean_symbol(g)) for c, g in enumerate(a.var_names) if clean_symbol(g) in model.vocab]
    ranked = sorted((c for c, _ in in_vocab if row[c] > 0), key=lambda c: (-row[c], c))[:62]
    text = " ".join(clean_symbol(a.var_names[c]) for c in ranked)
    enc = model.tokenizer(text, return_tensors="pt")
    assert enc["input_ids"].shape[1] == len(ranked) + 2        # </b> ... </s>, one token per gene
    enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])  # as the transformers 4.x tokenizer gave them
    with torch.inference_mode():
        hidden = model.model(**enc).last_hidden_state[0, 1:-1].mean(0).numpy()
    np.testing.assert_allclose(X[7].astype(np.float32), hidden, atol=2e-3)


@pytest.mark.parametrize("case, match", [
    ("no_tokenizer", "has no tokenizer.json"),
    ("wrong_model", "not tGPT"),
    ("vocab_mismatch", "does not match the tokenizer"),
])
def test_bad_checkpoints(cli, checkpoint, tmp_path, case, match):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (10, 3)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 5}, index=[f"c{i}" for i in range(10)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["B2M", "FTL", "ACTB"])).write_h5ad(tmp_path / "f.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "d", "--label-col", "response")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    if case == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
    elif case == "wrong_model":
        cfg["model_type"] = "bert"
        (bad / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": cfg["vocab_size"]}))
    elif case == "vocab_mismatch":
        cfg["vocab_size"] = 500
        (bad / "config.json").write_text(json.dumps(cfg))
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "tgpt", "--model-dir", bad, "--quiet", match=match)
    assert snapshot(st) == before


def test_batch_invariant_and_deterministic(checkpoint, pc9):
    """Right padding never leaks into a cell (causal model, mask-aware mean); reruns are identical."""
    from scdrugmap.extract.backbones.tgpt import TGPT

    a = ad.read_h5ad(pc9)

    class Source:
        name = "pc9"
        def symbols(self, upper=True): return np.asarray(a.var_names.astype(str))

    model = TGPT(model_dir=checkpoint, batch_size=5)
    block = sp.lil_matrix(a.X[:12])
    block[4] = 0                       # a cell with few genes: shorter than the others
    block[4, :3] = 1
    block = sp.csr_matrix(block)
    tok = model.cell_tokenizer(Source())
    batch = model.embed_block(block, tok)
    assert len(set(tok.lengths(tok.prepare(block)))) > 1          # the batch really is padded
    for i in (0, 4, 11):
        np.testing.assert_allclose(model.embed_block(block[i:i + 1], tok)[0], batch[i], atol=1e-5)
    np.testing.assert_array_equal(TGPT(model_dir=checkpoint, batch_size=3).embed_block(block, tok), batch)


def test_no_gene_overlap_and_normalized_input(cli, checkpoint, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (10, 3)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 5}, index=[f"c{i}" for i in range(10)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["FAKE1", "FAKE2", "FAKE3"])).write_h5ad(tmp_path / "f.h5ad")
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["B2M", "FTL", "ACTB"])).write_h5ad(tmp_path / "g.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "fake", "--label-col", "response")
    cli.ok("ingest", tmp_path / "g.h5ad", "--store", st, "--dataset", "norm", "--label-col", "response",
           "--values", "normalized")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "tgpt", "--dataset", "fake", "--model-dir", checkpoint,
              "--quiet", match="in the tGPT")
    cli.fails("extract", "--store", st, "--backbone", "tgpt", "--dataset", "norm", "--model-dir", checkpoint,
              "--quiet", match="needs raw counts")
    assert snapshot(st) == before
