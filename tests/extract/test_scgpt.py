"""scGPT: random weights in the official file layout and key names, with the real vocabulary and args.json."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import write_pc9_small
from conftest import snapshot
from official_scgpt import official_shapes, real_args, real_vocab, save_official_scgpt

torch = pytest.importorskip("torch")

from scdrugmap.extract.backbones.scgpt import BinnedTokenizer, ScGPT, quantile_bins, read_vocab  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

SMALL = {"embsize": 64, "nlayers": 2, "nheads": 4, "d_hid": 96}


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    return save_official_scgpt(tmp_path_factory.mktemp("scgpt") / "flash", variant="flash", **SMALL)


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=10)


def source_of(adata, name="pc9"):
    class Source:
        value_kind = "counts"

        def symbols(self, upper=True):
            return np.asarray(adata.var_names.astype(str))

    s = Source()
    s.name = name
    return s


# -- preprocessing, by hand ------------------------------------------------------------------
def test_binning_by_hand_with_ties():
    values = np.array([1, 1, 1, 2, 5, 10], dtype=np.float32)
    # 5 bins -> 4 quantile edges at 0, 1/3, 2/3, 1 of the sorted values: 1, 1, 3, 10
    np.testing.assert_allclose(np.quantile(values, np.linspace(0, 1, 4)), [1, 1, 3, 10])
    r = np.random.default_rng(7).random(6)
    # 1 equals two edges: left = 2 (edges <= 1), right = 0 (edges < 1) -> ceil(2 - 2r), 1 or 2 at random
    # 2 lies between edges 2 and 3 -> 2; 5 -> 3; 10 equals the last edge only: ceil(4 - r) = 4
    expected = [int(np.ceil(2 - 2 * x)) for x in r[:3]] + [2, 3, 4]
    assert quantile_bins(values, 5, np.random.default_rng(7)).tolist() == expected
    spread = {b for s in range(40) for b in quantile_bins(values, 5, np.random.default_rng(s))[:3]}
    assert spread == {1, 2}                              # ties really are spread over both bins
    # zeros keep bin 0, quantiles over the nonzero values only; all-zero and empty rows
    assert quantile_bins(np.array([0, 3, 0, 3.0]), 5, np.random.default_rng(0))[[0, 2]].tolist() == [0, 0]
    assert set(quantile_bins(np.array([0, 3, 0, 3.0]), 5, np.random.default_rng(0))[[1, 3]]) <= {1, 2, 3, 4}
    assert quantile_bins(np.zeros(3), 51, np.random.default_rng(0)).tolist() == [0, 0, 0]
    assert quantile_bins(np.array([]), 51, np.random.default_rng(0)).tolist() == []
    # 51 bins over distinct values: the minimum gets 1 and the maximum 50, order preserved
    b = quantile_bins(np.arange(1, 201, dtype=np.float32), 51, np.random.default_rng(0))
    assert b[0] == 1 and b[-1] == 50 and (np.diff(b) >= 0).all()


def test_tokens_by_hand():
    """Source columns 0, 2, 3 are in the vocabulary (ids 10, 12, 13); <cls> is 99, pad value -2."""
    tok = BinnedTokenizer(cols=np.array([0, 2, 3]), gene_ids=np.array([10, 12, 13]), cls_id=99, pad_value=-2,
                          n_bins=5, max_length=10, seed=0, dataset="d")
    counts = sp.csr_matrix(np.array([[4, 9, 0, 1, 7],      # matched: col0 = 4, col3 = 1 (col2 zero: dropped)
                                     [0, 3, 0, 0, 8],      # nothing matched and nonzero
                                     [0, 5, 2, 2, 0]], dtype=np.float32))
    prepared = tok.prepare(counts)
    t0 = tok.tokens(prepared, 0)
    # edges over [4, 1]: 1, 2, 3, 4 -> 4 gets bin 4, 1 gets bin 1; genes in source order after <cls>
    assert t0["input_ids"].tolist() == [99, 10, 13] and t0["values"].tolist() == [-2, 4, 1]
    assert t0["input_ids"].dtype == np.int64 and t0["values"].dtype == np.float32
    t1 = tok.tokens(prepared, 1)
    assert t1["input_ids"].tolist() == [99] and t1["values"].tolist() == [-2]
    t2 = tok.tokens(prepared, 2)                           # a 2 = 2 tie: every edge is 2 -> bins 1..4 at random
    assert t2["input_ids"].tolist() == [99, 12, 13] and t2["values"][0] == -2 and set(t2["values"][1:]) <= {1, 2, 3, 4}
    assert tok.lengths(prepared).tolist() == [3, 1, 3]


def test_sampling_above_max_length_is_reproducible():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(3, (6, 12)).astype(np.float32) + 1)     # 12 nonzero genes per cell
    ids = np.arange(100, 112)

    def make(max_length=5, seed=0, dataset="d"):
        return BinnedTokenizer(np.arange(12), ids, 99, -2, 51, max_length, seed, dataset)

    tok = make()
    prepared = tok.prepare(counts)
    full = make(max_length=100)
    assert tok.lengths(prepared).tolist() == [5] * 6
    for i in range(6):
        t = tok.tokens(prepared, i)
        assert t["input_ids"][0] == 99 and t["values"][0] == -2 and len(t["input_ids"]) == 5
        genes = t["input_ids"][1:] - 100
        assert len(set(genes)) == 4 and (np.diff(genes) > 0).all()             # distinct, in source order
        # bins come from the whole cell (before sampling): the same as without a length limit
        whole = full.tokens(full.prepare(counts), i)
        np.testing.assert_array_equal(t["values"][1:], whole["values"][1 + genes])
        # a cell's tokens are its own: the same alone, in another block, at another position
        alone = tok.tokens(tok.prepare(counts[i]), 0)
        moved = tok.tokens(tok.prepare(sp.vstack([counts[::-1], counts])), 5 - i)
        for other in (alone, moved, tok.tokens(prepared, i)):
            np.testing.assert_array_equal(other["input_ids"], t["input_ids"])
            np.testing.assert_array_equal(other["values"], t["values"])
    # another seed or another dataset draws other genes
    for other in (make(seed=1), make(dataset="e")):
        assert any(not np.array_equal(other.tokens(prepared, i)["input_ids"], tok.tokens(prepared, i)["input_ids"])
                   for i in range(6))


def test_vocabulary_special_tokens(tmp_path):
    vocab, added = read_vocab(_copy_vocab(tmp_path), "<pad>")
    n = len(real_vocab())
    assert added == ["<pad>", "<cls>", "<eoc>"]
    assert (vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"], len(vocab)) == (n, n + 1, n + 2, n + 3)
    with_specials = {"<cls>": 0, "A1BG": 1, "<pad>": 2}
    (tmp_path / "v2.json").write_text(json.dumps(with_specials))
    vocab, added = read_vocab(tmp_path / "v2.json")
    assert added == ["<eoc>"] and vocab["<cls>"] == 0 and vocab["<pad>"] == 2 and vocab["<eoc>"] == 3


def _copy_vocab(tmp_path):
    from official_scgpt import SCGPT_ASSETS

    shutil.copy(SCGPT_ASSETS / "default_census_vocab.json", tmp_path / "vocab.json")
    return tmp_path / "vocab.json"


# -- loading ---------------------------------------------------------------------------------
def test_strict_load_of_both_attention_layouts_and_finetuned_heads(flash, pc9_small, tmp_path):
    """The flash (Wqkv) and torch (in_proj) layouts of the same weights, and a fine-tuned
    checkpoint's extra cls_decoder, load and give the same embeddings."""
    torch_dir = save_official_scgpt(tmp_path / "torch", variant="torch", **SMALL)
    tuned_dir = save_official_scgpt(tmp_path / "tuned", variant="flash", finetuned=True, **SMALL)
    raw = torch.load(flash / "best_model.pt")
    ntoken = len(real_vocab()) + 3
    assert list(raw) == [k for k, _, _ in official_shapes({**real_args(), **SMALL}, ntoken)]
    assert raw["transformer_encoder.layers.1.self_attn.Wqkv.weight"].shape == (192, 64)
    a = ad.read_h5ad(pc9_small)
    block = sp.csr_matrix(a.X[:6])
    out = {}
    for name, folder in (("flash", flash), ("torch", torch_dir), ("tuned", tuned_dir)):
        model = ScGPT(model_dir=folder, batch_size=4)
        out[name] = model.embed_block(block, model.cell_tokenizer(source_of(a)))
        assert model.params()["attention_weights"] == {"flash": "Wqkv", "torch": "in_proj", "tuned": "Wqkv"}[name]
    assert model.params()["unused_checkpoint_heads"] == ["cls_decoder", "decoder.fc", "flag_encoder", "mvc_decoder"]
    np.testing.assert_array_equal(out["flash"], out["torch"])
    np.testing.assert_array_equal(out["flash"], out["tuned"])
    # the newer compatibility wrapper's names (self_attn._impl.*) load as well
    impl = tmp_path / "impl"
    shutil.copytree(flash, impl)
    state = {k.replace("self_attn.Wqkv.", "self_attn._impl.Wqkv.").replace("self_attn.out_proj.",
                                                                           "self_attn._impl.out_proj."): v
             for k, v in raw.items()}
    torch.save(state, impl / "best_model.pt")
    model = ScGPT(model_dir=impl, batch_size=4)
    assert model.attention_variant == "_impl.Wqkv"
    np.testing.assert_array_equal(model.embed_block(block, model.cell_tokenizer(source_of(a))), out["flash"])


def reference_embedding(state: dict, args: dict, ids, values) -> np.ndarray:
    """scGPT's ``_encode`` with plain torch ops on the raw (in_proj) tensors, ``<cls>`` output, L2-normalised."""
    from torch import nn
    from torch.nn import functional as F

    d = args["embsize"]
    ids, values = torch.as_tensor(ids)[None], torch.as_tensor(values)[None]
    genes = F.layer_norm(F.embedding(ids, state["encoder.embedding.weight"]), (d,),
                         state["encoder.enc_norm.weight"], state["encoder.enc_norm.bias"], eps=1e-5)
    v = values.unsqueeze(-1).clamp(max=512)
    v = F.relu(F.linear(v, state["value_encoder.linear1.weight"], state["value_encoder.linear1.bias"]))
    v = F.linear(v, state["value_encoder.linear2.weight"], state["value_encoder.linear2.bias"])
    v = F.layer_norm(v, (d,), state["value_encoder.norm.weight"], state["value_encoder.norm.bias"], eps=1e-5)
    x = genes + v
    for i in range(args["nlayers"]):
        layer = nn.TransformerEncoderLayer(d, args["nheads"], args["d_hid"], dropout=0.2, batch_first=True)
        prefix = f"transformer_encoder.layers.{i}."
        layer.load_state_dict({k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)})
        x = layer.eval()(x)
    cls = x[0, 0].numpy()
    return cls / np.linalg.norm(cls)


def test_embedding_equals_reference_forward_and_ignores_batch(pc9_small, tmp_path):
    folder = save_official_scgpt(tmp_path / "torch", variant="torch", seed=3, **SMALL)
    args = {**real_args(), **SMALL}
    state = torch.load(folder / "best_model.pt")
    model = ScGPT(model_dir=folder, batch_size=8, options={"max_length": 600})
    a = ad.read_h5ad(pc9_small)
    vocab = real_vocab()
    tok = model.cell_tokenizer(source_of(a))
    block = sp.csr_matrix(a.X)              # 10 cells above 600 tokens, 10 below: batches are padded
    lengths = tok.lengths(tok.prepare(block))
    assert lengths.max() == 600 and len(set(lengths)) > 5
    batch = model.embed_block(block, tok)
    assert batch.shape == (20, 64) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(model.embed_block(block, tok), batch)                      # deterministic
    prepared = tok.prepare(block)
    names = np.asarray(a.var_names.astype(str))
    for i in (0, 12, 15, 19):
        np.testing.assert_allclose(model.embed_block(block[i], tok)[0], batch[i], atol=1e-5)  # alone = in a batch
        t = tok.tokens(prepared, i)
        row = block[i].toarray().ravel()
        nonzero = [c for c in range(len(names)) if row[c] > 0 and names[c] in vocab]
        assert t["input_ids"][0] == len(vocab) + 1 and t["values"][0] == -2       # <cls> = 60695, value -2
        if len(nonzero) <= 599:
            assert t["input_ids"][1:].tolist() == [vocab[names[c]] for c in nonzero]
        else:                                                                       # sampled: 599 of them
            assert len(t["input_ids"]) == 600 and set(t["input_ids"][1:]) <= {vocab[names[c]] for c in nonzero}
        with torch.inference_mode():
            expected = reference_embedding(state, args, t["input_ids"], t["values"])
        np.testing.assert_allclose(batch[i], expected, atol=1e-5)


# -- the CLI on real data ----------------------------------------------------------------------
def test_extract_on_real_pc9_cells(cli, flash, pc9_small, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    args = ("extract", "--store", st, "--backbone", "scgpt", "--model-dir", flash, "--quiet", "--dtype", "float32")
    out = cli.ok(*args, "--batch-size", "8").output
    assert "20 cells x 64 (float32)" in out
    s = Store.open(st)
    X, cells = s.load("scgpt")
    assert X.shape == (20, 64) and X.dtype == np.float32 and np.isfinite(X).all()
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1, atol=1e-6)
    prov = s.provenance("scgpt").iloc[0]
    params = json.loads(prov["params"])
    assert params["genes_matched"] == 21052 and params["genes_in_dataset"] == 25077    # PC9 symbols in the vocabulary
    assert (params["n_bins"], params["max_len"], params["pad_value"], params["seed"]) == (51, 1200, -2, 0)
    assert params["attention_weights"] == "Wqkv" and len(params["vocab_sha256"]) == 64
    assert params["vocab_size"] == 60697 and len(prov["checkpoint_sha256"]) == 64
    # the stored rows are what the model gives for the same cells
    model = ScGPT(model_dir=flash)
    a = ad.read_h5ad(pc9_small)
    np.testing.assert_allclose(X[14:], model.embed_block(sp.csr_matrix(a.X[14:]), model.cell_tokenizer(source_of(a))),
                               atol=1e-5)
    # a rerun gives the same embeddings
    cli.ok(*args, "--batch-size", "8", "--force")
    np.testing.assert_array_equal(Store.open(st).load("scgpt")[0], X)
    # fewer tokens: the seed decides which genes are kept, and is recorded
    cli.ok(*args, "--force", "--option", "max_length=100", "--option", "seed=1")
    short = Store.open(st).load("scgpt")[0]
    params = json.loads(Store.open(st).provenance("scgpt").iloc[0]["params"])
    assert params["max_len"] == 100 and params["seed"] == 1
    cli.ok(*args, "--force", "--option", "max_length=100", "--option", "seed=2")
    assert not np.allclose(Store.open(st).load("scgpt")[0], short, atol=1e-5)
    assert not np.allclose(short, X, atol=1e-4)


# -- bad input -------------------------------------------------------------------------------
def _tiny(tmp_path, genes, name="f.h5ad", values=None):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (10, len(genes))).astype(np.float32) + 1)
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 5}, index=[f"c{i}" for i in range(10)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("case, match", [
    ("no_weights", "has no best_model.pt"),
    ("no_vocab", "has no vocab.json"),
    ("no_args", "has no args.json"),
    ("not_a_checkpoint", "cannot read"),
    ("geneformer_like", "does not match the scgpt model"),
    ("truncated", "2 missing (e.g. transformer_encoder.layers.1.self_attn.in_proj_weight"),
    ("extra_key", "1 unexpected (e.g. dsbn.bns.0.running_mean"),
    ("wrong_args", "not the size args.json and vocab.json imply"),
    ("bad_vocab", "ids are not 0.."),
])
def test_bad_checkpoints(cli, flash, tmp_path, case, match):
    st = tmp_path / "st"
    cli.ok("ingest", _tiny(tmp_path, ["B2M", "FTL", "ACTB"]), "--store", st, "--dataset", "d",
           "--label-col", "response")
    bad = tmp_path / "bad"
    shutil.copytree(flash, bad)
    state = torch.load(bad / "best_model.pt")
    if case == "no_weights":
        (bad / "best_model.pt").unlink()
    elif case == "no_vocab":
        (bad / "vocab.json").unlink()
    elif case == "no_args":
        (bad / "args.json").unlink()
    elif case == "not_a_checkpoint":
        (bad / "best_model.pt").write_text("not a checkpoint")
    elif case == "geneformer_like":
        torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4),
                    "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, bad / "best_model.pt")
    elif case == "truncated":
        torch.save({k: v for k, v in state.items() if ".layers.1.self_attn.Wqkv" not in k}, bad / "best_model.pt")
    elif case == "extra_key":
        torch.save({**state, "dsbn.bns.0.running_mean": torch.zeros(64)}, bad / "best_model.pt")
    elif case == "wrong_args":
        (bad / "args.json").write_text(json.dumps({**real_args(), **SMALL, "d_hid": 32}))
    elif case == "bad_vocab":
        (bad / "vocab.json").write_text(json.dumps({"A1BG": 0, "B2M": 2}))
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scgpt", "--model-dir", bad, "--quiet", match=match)
    assert snapshot(st) == before


def test_no_gene_overlap_and_normalized_input(cli, flash, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", _tiny(tmp_path, [f"FAKE{i}" for i in range(50)]), "--store", st, "--dataset", "fake",
           "--label-col", "response")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scgpt", "--model-dir", flash, "--quiet",
              match="only 0 of 50 gene symbols are in the scGPT vocabulary")
    assert snapshot(st) == before
    # almost no overlap (1 of 50 genes, under 5%) is refused as well
    cli.ok("ingest", _tiny(tmp_path, ["ACTB"] + [f"FAKE{i}" for i in range(49)], "g.h5ad"), "--store", st,
           "--dataset", "few", "--label-col", "response")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scgpt", "--dataset", "few", "--model-dir", flash, "--quiet",
              match="only 1 of 50")
    assert snapshot(st) == before
    cli.ok("ingest", _tiny(tmp_path, ["B2M", "FTL", "ACTB"], "n.h5ad"), "--store", st, "--dataset", "norm",
           "--label-col", "response", "--values", "log1p")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scgpt", "--dataset", "norm", "--model-dir", flash, "--quiet",
              match="needs raw counts")
    assert snapshot(st) == before
