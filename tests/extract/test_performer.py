"""The shared Performer encoder of scBERT and cellLM: official key layout, FAVOR+ attention against
plain-torch formulas written here, the deviations (key maximum per cell, key weights) and the
float64 positional table."""

from __future__ import annotations

import numpy as np
import pytest

from official_performer import (CELLLM_RELEASE, SCBERT_RELEASE, orthogonal_features, performer_lm_keys, random_state,
                                reference_attention, reference_forward, reference_kernel)

torch = pytest.importorskip("torch")
F = torch.nn.functional

from scdrugmap.errors import UserError  # noqa: E402
from scdrugmap.extract.performer import (PerformerSizes, build_performer, check_state,  # noqa: E402
                                         default_nb_features, encode, fast_attention, feature_map, load_state,
                                         read_checkpoint, sizes_from_state)


def sizes_for(num_tokens, dim, depth, heads, pos_rows, dim_head=64) -> PerformerSizes:
    return PerformerSizes(num_tokens, dim, depth, heads, dim_head, default_nb_features(dim_head), 4 * dim, pos_rows)


def qkv(b=3, h=2, n=9, d=16, m=20, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, orthogonal_features(m, d, g).double()


# ---- layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("release, n_keys", [(SCBERT_RELEASE, 91), (CELLLM_RELEASE, 147)])
def test_state_dict_names_and_shapes_are_the_official_ones(release, n_keys):
    with torch.device("meta"):
        model = build_performer(sizes_for(**release))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = performer_lm_keys(**release)
    assert ours == official and len(ours) == n_keys
    assert list(ours) == list(official)                                # state-dict order too
    assert model.pos_emb.emb.weight.dtype == torch.float64
    assert default_nb_features(64) == 266 == official["performer.net.layers.0.0.fn.fast_attention.projection_matrix"][0]


def test_sizes_are_read_back_from_a_state_dict(tmp_path):
    keys = performer_lm_keys(num_tokens=7, dim=8, depth=3, heads=2, pos_rows=11, dim_head=16)
    state = random_state(keys, np.zeros((10, 8), np.float32), [0.0])
    assert sizes_from_state(state, tmp_path / "x.pth", "scBERT") == PerformerSizes(7, 8, 3, 2, 16, 44, 32, 11)
    model = build_performer(sizes_from_state(state, tmp_path / "x.pth", "scBERT"))
    check_state(state, model, tmp_path / "x.pth", "fix")                 # no error
    state.pop("performer.net.layers.2.1.norm.bias")
    state["module.extra"] = torch.zeros(1)
    state["to_out.weight"] = torch.zeros(3, 8)
    with pytest.raises(UserError, match=r"1 missing \(e.g. performer.net.layers.2.1.norm.bias\); 1 unexpected "
                                        r"\(e.g. module.extra\); 1 mis-sized \(e.g. to_out.weight \(3, 8\)"):
        check_state(state, model, tmp_path / "x.pth", "fix")


def test_read_checkpoint(tmp_path):
    torch.save({"model_state_dict": {"a": torch.zeros(2)}, "epoch": 1}, tmp_path / "ok.pth")
    assert list(read_checkpoint(tmp_path / "ok.pth", "scBERT")) == ["a"]
    torch.save({"a": torch.zeros(2)}, tmp_path / "bare.pth")
    assert list(read_checkpoint(tmp_path / "bare.pth", "cellLM", param_key="")) == ["a"]
    with pytest.raises(UserError, match="has no model_state_dict of tensors"):
        read_checkpoint(tmp_path / "bare.pth", "scBERT")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read .* as a torch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth", "scBERT")


# ---- attention -----------------------------------------------------------------------------------
def test_fast_attention_matches_the_official_formulas_for_one_cell_per_batch():
    q, k, v, P = qkv()
    ours = fast_attention(q.float(), k.float(), v.float(), P.float(), torch.ones(3, 9))
    per_cell = torch.cat([reference_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], P) for i in range(3)])
    np.testing.assert_allclose(ours.numpy(), per_cell.numpy(), rtol=1e-5, atol=1e-6)
    # the official batch: one key maximum over all three cells moves each cell slightly
    batched = reference_attention(q, k, v, P)
    gap = (batched - per_cell).abs().max().item()
    assert 1e-7 < gap < 1e-2 * per_cell.abs().max().item()
    # ... and a cell's output then depends on its neighbours; ours does not
    alone = fast_attention(q[:1].float(), k[:1].float(), v[:1].float(), P.float(), torch.ones(1, 9))
    np.testing.assert_allclose(alone.numpy(), ours[:1].numpy(), rtol=1e-6, atol=1e-7)


def test_kernel_is_the_official_one():
    q, k, _, P = qkv()
    c = 16 ** -0.25
    dash = torch.einsum("bhnd,md->bhnm", c * k, P)
    by_hand = 20 ** -0.5 * (torch.exp(dash - (k ** 2).sum(-1, keepdim=True) * c ** 2 / 2 - dash.max()) + 1e-4)
    assert torch.allclose(reference_kernel(k, P, False), by_hand)
    qf = reference_kernel(q, P, True)                       # query side: a row maximum
    assert torch.allclose(qf.max(-1).values, 20 ** -0.5 * (torch.exp(-(q ** 2).sum(-1) * c ** 2 / 2) + 1e-4))


def test_key_weights_stand_for_repeated_padding():
    """cellLM pads to max_seq_len with identical PAD positions whose v is masked but whose keys
    count: one PAD position of key weight r gives the same outputs as r copies."""
    q, k, v, P = qkv(b=1, n=6)
    r = 7
    pad = lambda t: torch.cat([t, t[:, :, -1:].expand(-1, -1, r - 1, -1)], 2)   # last position repeated
    v_masked = v.clone()
    v_masked[:, :, -1] = 0
    literal = reference_attention(pad(q), pad(k), pad(v_masked), P)[:, :, :6]
    weights = torch.tensor([[1.0] * 5 + [r]])
    compact = fast_attention(q.float(), k.float(), v_masked.float(), P.float(), weights)
    np.testing.assert_allclose(compact.numpy(), literal.numpy(), rtol=1e-5, atol=1e-6)


def test_weight_zero_positions_are_ignored():
    q, k, v, P = qkv(b=2, n=5)
    base = fast_attention(q.float(), k.float(), v.float(), P.float(), torch.ones(2, 5))
    junk = lambda t, s: torch.cat([t, s * torch.ones_like(t[:, :, :3])], 2)
    padded = fast_attention(junk(q, 50).float(), junk(k, 50).float(), junk(v, 1e6).float(), P.float(),
                            torch.tensor([[1.0] * 5 + [0.0] * 3] * 2))
    assert torch.isfinite(padded).all()
    np.testing.assert_allclose(padded[:, :, :5].numpy(), base.numpy(), rtol=1e-6, atol=1e-7)


# ---- the whole encoder ---------------------------------------------------------------------------
def small_model(depth=2, seed=0, n_genes=30):
    sizes = dict(num_tokens=7, dim=16, depth=depth, heads=2, pos_rows=n_genes + 1)
    gene2vec = np.random.default_rng(seed).normal(0, 0.5, (n_genes, 16))     # float64 values
    state = random_state(performer_lm_keys(**sizes), gene2vec, [0.0], seed)
    model = build_performer(sizes_for(**sizes))
    load_state(model, state)
    return model, state


def test_encoder_matches_the_reference_forward_cell_by_cell():
    model, state = small_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 6, (4, 31), generator=g)
    positions = torch.arange(31).expand(4, -1)
    with torch.inference_mode():
        ours = encode(model, tokens, positions, torch.ones(4, 31))
    for i in range(4):
        ref = reference_forward(state, tokens[i:i + 1], positions[i:i + 1], heads=2)
        np.testing.assert_allclose(ours[i:i + 1].numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)
    # nothing is redrawn in eval: the stored projections and the counter stay as loaded
    for k in ("performer.net.layers.0.0.fn.fast_attention.projection_matrix", "performer.calls_since_last_redraw"):
        assert torch.equal(model.state_dict()[k], state[k])
    assert not model.training


def test_positional_table_is_float64_and_added_in_place():
    model, state = small_model(depth=0)
    assert model.pos_emb.emb.weight.dtype == torch.float64
    assert torch.equal(model.pos_emb.emb.weight, state["pos_emb.emb.weight"])
    tokens = torch.randint(0, 6, (2, 31))
    positions = torch.arange(31).expand(2, -1)
    with torch.inference_mode():
        ours = encode(model, tokens, positions, torch.ones(2, 31))
    tok, pos = state["token_emb.weight"][tokens], state["pos_emb.emb.weight"][positions]
    official = F.layer_norm((tok.double() + pos).float(), (16,), state["norm.weight"], state["norm.bias"])
    assert torch.equal(ours, official)                       # float32 += float64: computed in float64, rounded
    assert not torch.equal(tok + pos.float(), (tok.double() + pos).float())   # (a float32 add would differ)


# ---- key_max=batch: the official batched kernel --------------------------------------------------
def test_key_max_batch_is_one_maximum_over_the_whole_key_tensor():
    q, k, v, P = qkv()
    live = torch.ones(3, 9, dtype=torch.bool)
    c = 16 ** -0.25
    dash = torch.einsum("bhnd,md->bhnm", c * k, P)                 # from the raw tensors, float64
    diag = (k ** 2).sum(-1, keepdim=True) * c ** 2 / 2
    shared = 20 ** -0.5 * (torch.exp(dash - diag - dash.max()) + 1e-4)                         # torch.max(data_dash)
    own = 20 ** -0.5 * (torch.exp(dash - diag - dash.amax(dim=(1, 2, 3), keepdim=True)) + 1e-4)
    assert len(set(dash.amax(dim=(1, 2, 3)).tolist())) == 3          # the cells' own maxima differ
    batch = feature_map(k.float(), P.float(), False, live, "batch")
    np.testing.assert_allclose(batch.numpy(), shared.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(feature_map(k.float(), P.float(), False, live).numpy(), own.numpy(), rtol=1e-5,
                               atol=1e-9)
    # the attention is the official batched one, and differs from the per-cell one
    ours = fast_attention(q.float(), k.float(), v.float(), P.float(), torch.ones(3, 9), "batch")
    np.testing.assert_allclose(ours.numpy(), reference_attention(q, k, v, P).numpy(), rtol=1e-5, atol=1e-6)
    per_cell = fast_attention(q.float(), k.float(), v.float(), P.float(), torch.ones(3, 9))
    assert (ours - per_cell).abs().max().item() > 1e-3                # (the match above is to ~1e-6)
    # a batch of one cell: the same numbers either way
    for i in range(3):
        one = [t[i:i + 1].float() for t in (q, k, v)]
        assert torch.equal(fast_attention(*one, P.float(), torch.ones(1, 9), "batch"),
                           fast_attention(*one, P.float(), torch.ones(1, 9), "cell"))


def test_key_max_batch_leaves_weight_zero_positions_out():
    q, k, v, P = qkv(b=2, n=5)
    base = fast_attention(q.float(), k.float(), v.float(), P.float(), torch.ones(2, 5), "batch")
    junk = lambda t, s: torch.cat([t, s * torch.ones_like(t[:, :, :3])], 2)
    weights = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 5 + [0.0] * 3])
    padded = fast_attention(junk(q, 50).float(), junk(k, 50).float(), junk(v, 1e6).float(), P.float(), weights,
                            "batch")
    assert torch.isfinite(padded).all()
    np.testing.assert_allclose(padded[:, :, :5].numpy(), base.numpy(), rtol=1e-6, atol=1e-7)


def test_encoder_with_key_max_batch_is_the_official_batched_forward():
    model, state = small_model()
    tokens = torch.randint(0, 6, (4, 31), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(31).expand(4, -1)
    with torch.inference_mode():
        batch = encode(model, tokens, positions, torch.ones(4, 31), key_max="batch")
        cell = encode(model, tokens, positions, torch.ones(4, 31))
    official = reference_forward(state, tokens, positions, heads=2)          # one call = one official batch
    np.testing.assert_allclose(batch.numpy(), official.numpy(), rtol=1e-4, atol=1e-5)
    assert (batch - cell).abs().max().item() > 1e-3                  # (the match above is to ~1e-5)
