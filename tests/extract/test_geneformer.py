"""Geneformer: official checkpoint layout with the real V1 dictionaries, random weights."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import save_geneformer, write_pc9_small
from conftest import snapshot

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scdrugmap.extract.backbones.geneformer import RankValueTokenizer  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_geneformer(tmp_path_factory.mktemp("gf") / "gf-6L")


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=20)


def test_rank_value_encoding_by_hand():
    """3 cells x 4 source genes; source genes 1 and 3 are the same Ensembl ID (summed)."""
    collapse = sp.csr_matrix(np.array([[1, 0, 0],      # gene0 -> vocab A
                                       [0, 1, 0],      # gene1 -> vocab B
                                       [0, 0, 1],      # gene2 -> vocab C
                                       [0, 1, 0]]))    # gene3 -> vocab B as well
    tok = RankValueTokenizer(collapse, token_ids=np.array([10, 11, 12]), medians=np.array([1.0, 2.0, 4.0]),
                             max_genes=2, cls_id=None, eos_id=None)
    counts = sp.csr_matrix(np.array([[1, 2, 4, 1],     # total 8: A 1/8e4/1, B 3/8e4/2, C 4/8e4/4 -> B > A = C
                                     [0, 0, 0, 0],
                                     [5, 0, 0, 0]], dtype=float))
    values = tok.prepare(counts)
    assert tok.tokens(values, 0).tolist() == [11, 10]          # B (1.5), then A beats C on the tie (gene order)
    assert tok.tokens(values, 1).tolist() == []
    assert tok.tokens(values, 2).tolist() == [10]
    assert tok.lengths(values).tolist() == [2, 0, 1]
    np.testing.assert_allclose(values.toarray()[0], [1 / 8 * 1e4, 3 / 8 * 1e4 / 2, 4 / 8 * 1e4 / 4])
    v2 = RankValueTokenizer(collapse, np.array([10, 11, 12]), np.array([1.0, 2.0, 4.0]), 2, cls_id=2, eos_id=3)
    assert v2.tokens(values, 0).tolist() == [2, 11, 10, 3] and v2.lengths(values).tolist() == [4, 2, 3]


def test_ties_follow_source_gene_order(checkpoint):
    """Two genes of the release's dictionaries with the same median and the same count tie: they
    are ranked in the source's gene order (here the reverse of the dictionary's order)."""
    from scdrugmap.extract.backbones.geneformer import Geneformer

    model = Geneformer(model_dir=checkpoint, batch_size=2)
    later, earlier = "ENSG00000264844", "ENSG00000207632"      # both median 1.4484356894553883
    assert model.medians[later] == model.medians[earlier] and model.tokens[later] > model.tokens[earlier]

    class Source:
        name, value_kind = "ties", "counts"
        def ensembl_ids(self): return np.array([later, earlier, "ENSG00000000003"])
        def symbols(self, upper=True): return np.array(["A", "B", "C"])

    tok = model.cell_tokenizer(Source())
    ids = tok.tokens(tok.prepare(sp.csr_matrix(np.array([[3, 3, 0], [3, 3, 1]], dtype=np.float32))), 0)
    assert ids.tolist() == [model.tokens[later], model.tokens[earlier]]


def test_extract_on_real_pc9_cells(cli, checkpoint, pc9_small, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    out = cli.ok("extract", "--store", st, "--backbone", "geneformer", "--model-dir", checkpoint,
                 "--batch-size", "16", "--quiet").output
    assert "40 cells x 256 (float16)" in out
    s = Store.open(st)
    X, cells = s.load("geneformer")
    assert X.shape == (40, 256) and X.dtype == np.float16 and np.isfinite(X).all()
    prov = s.provenance("geneformer").iloc[0]
    params = json.loads(prov["params"])
    assert params["version"] == "V1" and params["hidden_states_index"] == 5 and params["input_size"] == 2048
    assert params["genes_matched"] == 13166   # PC9 symbols found through gene_name_id_dict
    assert len(prov["checkpoint_sha256"]) == 64
    # deterministic: a forced re-run with another batch size gives the same embeddings
    cli.ok("extract", "--store", st, "--backbone", "geneformer", "--model-dir", checkpoint, "--batch-size", "7",
           "--force", "--quiet")
    X2, _ = Store.open(st).load("geneformer")
    np.testing.assert_allclose(X2.astype(np.float32), X.astype(np.float32), atol=2e-3)


def test_embedding_matches_manual_forward_and_ignores_batch(checkpoint, pc9_small):
    """The engine's pooled vector equals a direct forward of the same tokens, alone or in a batch."""
    from scdrugmap.extract.backbones.geneformer import Geneformer

    model = Geneformer(model_dir=checkpoint, batch_size=8)
    a = ad.read_h5ad(pc9_small)

    class Source:
        name, value_kind = "pc9", "counts"
        def ensembl_ids(self): return None
        def symbols(self, upper=True): return np.asarray(a.var_names.astype(str))

    tok = model.cell_tokenizer(Source())
    block = sp.csr_matrix(a.X[:20])
    batch = model.embed_block(block, tok)
    alone = model.embed_block(block[3:4], tok)
    np.testing.assert_allclose(alone[0], batch[3], atol=1e-5)
    ids = torch.tensor(tok.tokens(tok.prepare(block[3:4]), 0))[None]
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             output_hidden_states=True).hidden_states[5]
    np.testing.assert_allclose(batch[3], hidden[0].mean(0).numpy(), atol=1e-5)


@pytest.mark.parametrize("config_file, layers, width", [("config_6L.json", 6, 256), ("config_12L.json", 12, 512)])
def test_both_v1_release_configs_load(config_file, layers, width, pc9_small, tmp_path):
    """The release's 6- and 12-layer V1 configs, unchanged: second-to-last layer by default."""
    from scdrugmap.extract.backbones.geneformer import Geneformer

    model = Geneformer(model_dir=save_geneformer(tmp_path / "gf", config_file), batch_size=2)
    params = model.params()
    assert (model.dim, model.n_layers, params["hidden_states_index"], params["input_size"]) == \
        (width, layers, layers - 1, 2048)
    a = ad.read_h5ad(pc9_small)

    class Source:
        name, value_kind = "pc9", "counts"
        def ensembl_ids(self): return None
        def symbols(self, upper=True): return np.asarray(a.var_names.astype(str))

    keep = (np.arange(a.n_vars) < 3000).astype(np.float32)
    block = sp.csr_matrix(sp.csr_matrix(a.X[:2]).multiply(keep[None, :]))   # fewer genes: a quick forward
    emb = model.embed_block(block, model.cell_tokenizer(Source()))
    assert emb.shape == (2, width) and np.isfinite(emb).all()


def test_v2_checkpoint_cls_eos_truncation_and_gene_token_mean(cli, pc9_small, tmp_path):
    """A V2 dictionary (<cls>/<eos>): input size from the config, special tokens added after
    truncation to input size - 2 genes, and the mean taken over gene tokens only."""
    from scdrugmap.extract.backbones.geneformer import Geneformer

    ckpt = save_geneformer(tmp_path / "gf-v2", v2=True, max_position_embeddings=128, hidden_size=64,
                           num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
    model = Geneformer(model_dir=ckpt, batch_size=4)
    a = ad.read_h5ad(pc9_small)

    class Source:
        name, value_kind = "pc9", "counts"
        def ensembl_ids(self): return None
        def symbols(self, upper=True): return np.asarray(a.var_names.astype(str))

    tok = model.cell_tokenizer(Source())
    block = sp.csr_matrix(a.X[:6])
    prepared = tok.prepare(block)
    cls_id, eos_id = model.tokens["<cls>"], model.tokens["<eos>"]
    for i in range(6):
        ids = tok.tokens(prepared, i)
        assert ids[0] == cls_id and ids[-1] == eos_id and len(ids) == 128     # PC9 cells have > 126 genes
        assert cls_id not in ids[1:-1] and eos_id not in ids[1:-1]
        # the 126 genes kept are the 126 highest normalised values
        row = prepared.getrow(i).toarray().ravel()
        assert np.sort(row)[::-1][125] <= row[np.argsort(-row, kind="stable")][:126].min()
    emb = model.embed_block(block, tok)
    ids = torch.tensor(tok.tokens(prepared, 2))[None]
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                             output_hidden_states=True).hidden_states[2]      # 3 layers: second-to-last
    np.testing.assert_allclose(emb[2], hidden[0, 1:-1].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(emb[2], hidden[0].mean(0).numpy(), atol=1e-5)    # <cls>/<eos> really left out
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "geneformer", "--model-dir", ckpt, "--quiet")
    params = json.loads(Store.open(st).provenance("geneformer").iloc[0]["params"])
    assert params["version"] == "V2" and params["input_size"] == 128 and params["hidden_states_index"] == 2
    assert params["pooling"] == "mean over non-padding gene tokens"
    X, _ = Store.open(st).load("geneformer", dtype=np.float32)
    np.testing.assert_allclose(X[:6], emb, atol=2e-2)     # float16 storage


@pytest.mark.parametrize("case, match", [
    ("missing_dictionary", "gene median dictionary file"),
    ("wrong_model", "not Geneformer"),
    ("vocab_mismatch", "does not match the token dictionary"),
    ("no_weights", "no model.safetensors or pytorch_model.bin"),
    ("missing_keys", "lacks or mis-sizes"),
])
def test_bad_checkpoints(cli, checkpoint, pc9_small, tmp_path, case, match):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    if case == "missing_dictionary":
        (bad / "gene_median_dictionary.pkl").unlink()
    elif case == "wrong_model":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": cfg["vocab_size"]}))
    elif case == "vocab_mismatch":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["vocab_size"] = 1000
        (bad / "config.json").write_text(json.dumps(cfg))
    elif case == "no_weights":
        for f in bad.glob("model.safetensors"):
            f.unlink()
    elif case == "missing_keys":   # a bare encoder without the MLM head: not the release's checkpoint
        cfg = transformers.BertConfig.from_pretrained(bad)
        transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(bad)
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "geneformer", "--model-dir", bad, "--quiet", match=match)
    assert snapshot(st) == before


def test_no_gene_overlap_and_normalized_input(cli, checkpoint, tmp_path):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (20, 50)).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 10}, index=[f"c{i}" for i in range(20)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"FAKE{i}" for i in range(50)])).write_h5ad(tmp_path / "f.h5ad")
    st = tmp_path / "st"
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "fake", "--label-col", "response")
    cli.fails("extract", "--store", st, "--backbone", "geneformer", "--model-dir", checkpoint, "--quiet",
              match="are in the Geneformer vocabulary")
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", st, "--dataset", "norm", "--label-col", "response",
           "--values", "log1p")
    cli.fails("extract", "--store", st, "--backbone", "geneformer", "--dataset", "norm", "--model-dir", checkpoint,
              "--quiet", match="needs raw counts")


def test_offline_hub_id_is_a_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    X = sp.csr_matrix(np.ones((4, 3), dtype=np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 2}, index=[f"c{i}" for i in range(4)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["A1BG", "EGFR", "TP53"])).write_h5ad(tmp_path / "f.h5ad")
    cli.ok("ingest", tmp_path / "f.h5ad", "--store", tmp_path / "st", "--dataset", "d", "--label-col", "response")
    cli.fails("extract", "--store", tmp_path / "st", "--backbone", "geneformer", "--model-dir",
              "ctheodoris/Geneformer", "--quiet", match="not in the Hugging Face cache")
