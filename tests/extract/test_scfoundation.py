"""scFoundation: the release's models.ckpt layout (random weights, small encoder) with the real
19,264-gene index (seq_len 19,266), checked against a one-cell reference forward written below."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from checkpoints import write_pc9_small
from conftest import snapshot
from official_scfoundation import GENE_INDEX, N_GENES, official_shapes, save_scfoundation

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.extract.backbones.scfoundation import ScFoundation  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

HIDDEN = 64        # official_config's default encoder width: embeddings are 4 x 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_scfoundation(tmp_path_factory.mktemp("scf") / "scf")


@pytest.fixture(scope="module")
def pc9_small(tmp_path_factory):
    # 2 control cells (4,900 and 4,200 expressed genes of the index) and 2 erlotinib cells (~400)
    return write_pc9_small(tmp_path_factory.mktemp("data") / "pc9_small.h5ad", per_class=2)


@pytest.fixture(scope="module")
def pc9_cells(pc9_small):
    a = ad.read_h5ad(pc9_small)
    return sp.csr_matrix(a.X), np.asarray(a.var_names.astype(str))


class Source:
    def __init__(self, symbols, name="d"):
        self.name, self.value_kind, self._symbols = name, "counts", np.asarray(symbols)

    def symbols(self, upper=True):
        return np.char.upper(self._symbols) if upper else self._symbols


def gene_positions() -> dict:
    with open(GENE_INDEX, newline="") as f:
        return {r["gene_name"]: int(r["index"]) for r in csv.DictReader(f, delimiter="\t")}


def reference_embedding(state, counts, symbols, target=4.0, pool="all"):
    """The official get_embedding.py path for ONE cell (batch of 1, no padding), in float64 torch
    ops on the raw state dict: align by exact symbol, log1p(x / x.sum() * 1e4) with T and S
    appended, keep values > 0 (gatherData), AutoDiscretizationEmbedding2 + pos_emb, post-norm
    encoder layers with the padding mask value == 103, final norm, then pool."""
    W = {k[len("model."):]: v.double() for k, v in state.items() if v.is_floating_point()}
    where = gene_positions()
    x = np.zeros(N_GENES)
    for c, s in enumerate(symbols):
        if s in where:
            x[where[s]] = counts[c]
    total = x.sum()
    full = torch.tensor(list(np.log1p(x / total * 1e4)) + [target, np.log10(total)])   # float32, as official
    keep = full > 0
    v, pos = full[keep].double(), torch.arange(N_GENES + 2)[keep]

    h = F.leaky_relu(v[:, None] @ W["token_emb.mlp.weight"].T + W["token_emb.mlp.bias"], 0.1)
    w = torch.softmax(1.0 * h + h @ W["token_emb.mlp2.weight"].T + W["token_emb.mlp2.bias"], dim=-1)
    e = w @ W["token_emb.emb.weight"]
    e[v == 102] = W["token_emb.emb_mask.weight"][0]
    e[v == 103] = W["token_emb.emb_pad.weight"][0]
    h = e + W["pos_emb.weight"][pos]
    pad = v == 103
    D, heads = h.shape[1], 4
    i = 0
    while f"encoder.transformer_encoder.{i}.linear1.weight" in W:
        p = f"encoder.transformer_encoder.{i}."
        q, k, val = (h @ W[p + "self_attn.in_proj_weight"].T + W[p + "self_attn.in_proj_bias"]).split(D, dim=-1)
        q, k, val = (t.reshape(len(h), heads, D // heads).transpose(0, 1) for t in (q, k, val))
        scores = q @ k.transpose(1, 2) / math.sqrt(D // heads)
        scores[:, :, pad] = -math.inf
        a = (torch.softmax(scores, dim=-1) @ val).transpose(0, 1).reshape(len(h), D)
        h = F.layer_norm(h + a @ W[p + "self_attn.out_proj.weight"].T + W[p + "self_attn.out_proj.bias"], (D,),
                         W[p + "norm1.weight"], W[p + "norm1.bias"], 1e-5)
        ff = F.relu(h @ W[p + "linear1.weight"].T + W[p + "linear1.bias"]) @ W[p + "linear2.weight"].T
        h = F.layer_norm(h + ff + W[p + "linear2.bias"], (D,), W[p + "norm2.weight"], W[p + "norm2.bias"], 1e-5)
        i += 1
    h = F.layer_norm(h, (D,), W["encoder.norm.weight"], W["encoder.norm.bias"], 1e-5)
    if pool == "max":
        return h.max(0).values.numpy()
    return torch.cat([h[-1], h[-2], h[:-2].max(0).values, h[:-2].mean(0)]).numpy()


def test_strict_load_of_the_official_layout(checkpoint):
    model = ScFoundation(model_dir=checkpoint)
    saved = torch.load(checkpoint / "models.ckpt", weights_only=True)
    state = saved["cell"]["state_dict"]
    ours = model.model.state_dict()
    assert set(ours) == {k[len("model."):] for k in state} == set(official_shapes(saved["cell"]["config"]))
    for key in ("pos_emb.weight", "token_emb.mlp2.weight", "decoder.performer.net.layers.0.0.fn.fast_attention."
                "projection_matrix", "encoder.transformer_encoder.1.self_attn.in_proj_weight"):
        assert torch.equal(ours[key], state["model." + key])
    assert ours["pos_emb.weight"].shape == (N_GENES + 3, HIDDEN)
    assert model.dim == 4 * HIDDEN and ScFoundation(model_dir=checkpoint, options={"pool": "max"}).dim == HIDDEN
    assert model.checkpoint_sha256() == hashlib.sha256((checkpoint / "models.ckpt").read_bytes()).hexdigest()


def test_preprocessing_by_hand(checkpoint):
    """A1BG is gene 0, A1CF gene 1, ZZZ3 gene 19263; T and S sit at 19264 and 19265."""
    assert [gene_positions()[g] for g in ("A1BG", "A1CF", "ZZZ3")] == [0, 1, 19263]
    model = ScFoundation(model_dir=checkpoint)
    # NOTAGENE is dropped; zzz3 matches ZZZ3 ignoring case; a1bg does not: A1BG is taken exactly
    source = Source(["A1CF", "NOTAGENE", "A1BG", "zzz3", "a1bg"])
    assert model.dataset_params(source) == {"genes_matched": 3, "genes_matched_ignoring_case": 1}
    tok = model.cell_tokenizer(source)
    counts = sp.csr_matrix(np.array([[3, 100, 1, 0, 50],    # total over aligned genes: 4
                                     [0, 5, 0, 0, 7],       # no aligned counts: only T
                                     [0, 0, 0, 10, 0],      # total 10: S = 1
                                     [1, 0, 0, 0, 0]]))     # total 1: S = log10(1) = 0 is left out
    p = tok.prepare(counts)
    f32 = np.float32
    expected = [([0, 1, 19264, 19265], [np.log1p(1 / 4 * 1e4), np.log1p(3 / 4 * 1e4), 4.0, np.log10(4)]),
                ([19264], [4.0]),
                ([19263, 19264, 19265], [np.log1p(1e4), 4.0, 1.0]),
                ([1, 19264], [np.log1p(1e4), 4.0])]
    for i, (ids, values) in enumerate(expected):
        t = tok.tokens(p, i)
        assert t["input_ids"].tolist() == ids
        np.testing.assert_array_equal(t["values"], np.array(values).astype(f32))
    assert tok.lengths(p).tolist() == [4, 1, 3, 2]
    # the other T modes of the official --tgthighres
    f2 = ScFoundation(model_dir=checkpoint, options={"target": "f2"})
    a1 = ScFoundation(model_dir=checkpoint, options={"target": "a1"})
    t = f2.cell_tokenizer(source).tokens(f2.cell_tokenizer(source).prepare(counts), 0)
    assert t["values"][-2] == f32(np.log10(8))
    assert f2.cell_tokenizer(source).lengths(f2.cell_tokenizer(source).prepare(counts))[1] == 0   # log10(0): no T
    t = a1.cell_tokenizer(source).tokens(a1.cell_tokenizer(source).prepare(counts), 0)
    assert t["values"][-2] == f32(np.log10(4) + 1)


@pytest.fixture(scope="module")
def batched(checkpoint, pc9_cells):
    """The 4 cells in one batch: the erlotinib cells are ~90% padding."""
    model = ScFoundation(model_dir=checkpoint, batch_size=4)
    return model.embed_block(pc9_cells[0], model.cell_tokenizer(Source(pc9_cells[1])))


def test_embedding_equals_one_cell_reference_forward(checkpoint, pc9_cells, batched):
    """Batched = the official one-cell path; alone = in a batch; the same twice."""
    block, symbols = pc9_cells
    state = torch.load(checkpoint / "models.ckpt", weights_only=True)["cell"]["state_dict"]
    assert batched.shape == (4, 4 * HIDDEN) and batched.dtype == np.float32 and np.isfinite(batched).all()
    for i in (1, 3):     # a control cell (4,218 tokens) and an erlotinib cell (~380)
        ref = reference_embedding(state, block[i].toarray().ravel(), symbols)
        np.testing.assert_allclose(batched[i], ref, atol=1e-4)
    model = ScFoundation(model_dir=checkpoint, batch_size=4)
    tok = model.cell_tokenizer(Source(symbols))
    alone = model.embed_block(block[3:4], tok)
    np.testing.assert_allclose(alone[0], batched[3], atol=1e-5)
    np.testing.assert_array_equal(model.embed_block(block[3:4], tok), alone)
    # pool=max: max over all tokens, T and S included
    mx = ScFoundation(model_dir=checkpoint, batch_size=4, options={"pool": "max"})
    out = mx.embed_block(block[2:], mx.cell_tokenizer(Source(symbols)))
    assert out.shape == (2, HIDDEN)
    np.testing.assert_allclose(out[1], reference_embedding(state, block[3].toarray().ravel(), symbols, pool="max"),
                               atol=1e-4)
    # another entry of models.ckpt gives other weights
    rde = ScFoundation(model_dir=checkpoint, options={"entry": "rde"})
    assert not np.allclose(rde.embed_block(block[3:4], rde.cell_tokenizer(Source(symbols)))[0], batched[3], atol=1e-2)


def test_cells_too_short_for_the_official_pooling(checkpoint):
    """The official script fails on a cell with < 3 tokens; here the slots that do not exist are 0."""
    model = ScFoundation(model_dir=checkpoint, batch_size=4)
    tok = model.cell_tokenizer(Source(["A1BG", "A1CF"]))
    counts = sp.csr_matrix(np.array([[0, 0], [1, 0], [5, 2]]))   # [T]; [A1BG, T] (S = 0 left out); 4 tokens
    assert tok.lengths(tok.prepare(counts)).tolist() == [1, 2, 4]
    emb = model.embed_block(counts, tok)
    assert np.isfinite(emb).all()
    last, second, gmax, gmean = np.split(emb, 4, axis=1)
    assert (np.abs(last) > 0).all(axis=1).all() and not second[0].any() and second[1:].all()
    assert not gmax[:2].any() and not gmean[:2].any() and gmax[2].any()
    np.testing.assert_allclose(emb[2], model.embed_block(counts[2:], tok)[0], atol=1e-5)


def test_values_equal_to_mask_and_pad_ids_follow_the_official_code(checkpoint, pc9_cells):
    """T = 103 (the pad id) gets the pad embedding and is masked as a key, as officially."""
    block, symbols = pc9_cells
    state = torch.load(checkpoint / "models.ckpt", weights_only=True)["cell"]["state_dict"]
    model = ScFoundation(model_dir=checkpoint, options={"target": "t103"})
    emb = model.embed_block(block[2:4], model.cell_tokenizer(Source(symbols)))
    ref = reference_embedding(state, block[3].toarray().ravel(), symbols, target=103.0)
    np.testing.assert_allclose(emb[1], ref, atol=1e-4)
    from scdrugmap.extract.backbones.scfoundation import value_embedding

    e = value_embedding(model.model.token_emb, torch.tensor([[0.5, 102.0, 103.0]]), model.cfg)[0]
    assert torch.equal(e[1], state["model.token_emb.emb_mask.weight"][0])
    assert torch.equal(e[2], state["model.token_emb.emb_pad.weight"][0])


def test_extract_on_real_pc9_via_cli(cli, checkpoint, pc9_small, batched, tmp_path):
    st = tmp_path / "st"
    cli.ok("ingest", pc9_small, "--store", st, "--dataset", "pc9", "--label-col", "response")
    out = cli.ok("extract", "--store", st, "--backbone", "scfoundation", "--model-dir", checkpoint,
                 "--batch-size", "4", "--quiet").output
    assert f"4 cells x {4 * HIDDEN} (float16)" in out
    s = Store.open(st)
    X, _ = s.load("scfoundation")
    assert X.shape == (4, 4 * HIDDEN) and X.dtype == np.float16 and np.isfinite(X).all()
    prov = s.provenance("scfoundation").iloc[0]
    params = json.loads(prov["params"])
    assert params["entry"] == "cell" and params["target"] == "t4" and params["pool"] == "all"
    assert params["genes_matched"] == 13133 and params["genes_matched_ignoring_case"] == 0   # PC9 symbols
    assert params["gene_index_sha256"] == hashlib.sha256(GENE_INDEX.read_bytes()).hexdigest()
    assert params["seq_len"] == N_GENES + 2 and params["hidden"] == HIDDEN
    assert prov["checkpoint_sha256"] == hashlib.sha256((checkpoint / "models.ckpt").read_bytes()).hexdigest()
    # float32 store round trip, one cell per batch: equals the in-memory embedding of one batch of 4
    cli.ok("extract", "--store", st, "--backbone", "scfoundation", "--model-dir", checkpoint, "--batch-size", "1",
           "--dtype", "float32", "--force", "--quiet")
    X32, _ = Store.open(st).load("scfoundation", dtype=np.float32)
    np.testing.assert_allclose(X32, batched, atol=1e-5)
    np.testing.assert_allclose(X.astype(np.float32), batched, rtol=1e-3, atol=1e-3)    # float16 storage
    assert "scfoundation" in cli.ok("backbones").output


def _tiny_dataset(cli, tmp_path, symbols=("B2M", "ACTB", "FTL"), name="d", values=None):
    X = sp.csr_matrix(np.random.default_rng(0).poisson(2, (10, len(symbols))).astype(np.float32))
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 5}, index=[f"c{i}" for i in range(10)])
    path = tmp_path / f"{name}.h5ad"
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(symbols))).write_h5ad(path)
    st = tmp_path / "st"
    cli.ok("ingest", path, "--store", st, "--dataset", name, "--label-col", "response",
           *(["--values", values] if values else []))
    return st


def _edit_checkpoint(folder, change):
    data = torch.load(folder / "models.ckpt", weights_only=True)
    change(data)
    torch.save(data, folder / "models.ckpt")


@pytest.mark.parametrize("case, match", [
    ("no_checkpoint", "has no models.ckpt"),
    ("no_gene_index", "OS_scRNA_gene_index.19264.tsv not found"),
    ("missing_key", "does not match scFoundation's MaeAutobin: 1 missing (e.g. decoder.performer.net.layers.0.0"),
    ("unexpected_key", "1 unexpected (e.g. extra.weight)"),
    ("mis_shaped", "1 mis-sized (e.g. pos_emb.weight (100, 64), expected (19267, 64))"),
    ("no_entry", "has no 'cell' entry (it has: gene, rde)"),
    ("short_gene_index", "seq_len is 19266, but short.tsv lists 100 genes"),
    ("not_a_checkpoint", "cannot read"),
    ("bad_target", "--option target='x4'"),
])
def test_bad_checkpoints(cli, checkpoint, tmp_path, case, match):
    import shutil

    st = _tiny_dataset(cli, tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    options = []
    decoder_key = "model.decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix"
    if case == "no_checkpoint":
        (bad / "models.ckpt").unlink()
    elif case == "no_gene_index":
        (bad / GENE_INDEX.name).unlink()
    elif case == "missing_key":         # a decoder buffer: the embedding never uses it, the strict load needs it
        _edit_checkpoint(bad, lambda d: d["cell"]["state_dict"].pop(decoder_key))
    elif case == "unexpected_key":
        _edit_checkpoint(bad, lambda d: d["cell"]["state_dict"].__setitem__("model.extra.weight", torch.zeros(2)))
    elif case == "mis_shaped":
        _edit_checkpoint(bad, lambda d: d["cell"]["state_dict"].__setitem__("model.pos_emb.weight",
                                                                           torch.zeros(100, HIDDEN)))
    elif case == "no_entry":
        _edit_checkpoint(bad, lambda d: d.pop("cell"))
    elif case == "short_gene_index":
        lines = GENE_INDEX.read_text().splitlines()[:101]
        (tmp_path / "short.tsv").write_text("\n".join(lines) + "\n")
        options = ["--option", f"gene_index={tmp_path / 'short.tsv'}"]
    elif case == "not_a_checkpoint":
        (bad / "models.ckpt").write_bytes(b"not a checkpoint")
    elif case == "bad_target":
        options = ["--option", "target=x4"]
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scfoundation", "--model-dir", bad, *options, "--quiet",
              match=match)
    assert snapshot(st) == before


def test_no_gene_overlap_and_normalized_input(cli, checkpoint, tmp_path):
    st = _tiny_dataset(cli, tmp_path, symbols=[f"FAKE{i}" for i in range(50)], name="fake")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scfoundation", "--model-dir", checkpoint, "--quiet",
              match="only 0 of 50 genes are in scFoundation's gene index")
    assert snapshot(st) == before
    _tiny_dataset(cli, tmp_path, name="norm", values="log1p")
    before = snapshot(st)
    cli.fails("extract", "--store", st, "--backbone", "scfoundation", "--dataset", "norm", "--model-dir", checkpoint,
              "--quiet", match="needs raw counts")
    assert snapshot(st) == before
