"""A randomly initialised CellPLM checkpoint in the official release layout.

``<name>.config.json`` is the real release config (its 19,374-gene list included) with sizes
shrunk by overrides; ``<name>.best.ckpt`` is ``torch.save({"model_state_dict": ...})`` whose keys
and shapes are written out here from the official code (github.com/OmicsML/CellPLM @ b59ee76):
the training model ``OmicsFormer(head_type=None)`` of ``model/cellformer.py``, whose submodules
are ``embedder`` (``embedder/omics.py``), ``encoder`` (``encoder/transformer.py`` with
``layer/flowformer.py::FlowformerLayer``), ``latent`` (``latent/__init__.py::LatentModel``:
placeholder + ``latent/autoencoders.py::GMVAELatentLayer``), ``pre_latent_norm`` and ``decoder``
(``decoder/zinb.py::NBMLPDecoder``). ``mask_model`` and ``objective`` have no weights.

Nothing here uses scdrugmap's own module, so a wrong key name there fails the strict load.
Used by the tests; needs neither pytest nor conftest.
"""

from __future__ import annotations

import json
from pathlib import Path

from checkpoints import SHARED, _missing

CELLPLM_ASSETS = SHARED / "backbone_assets" / "cellplm"
RELEASE = "20230926_85M"
# Sizes small enough for a 2-core test run; the real gene list is kept.
SMALL = {"enc_hid": 64, "enc_layers": 2, "post_latent_dim": 32, "dec_hid": 32, "batch_num": 4, "dataset_num": 3}


def release_config(**overrides) -> dict:
    path = CELLPLM_ASSETS / f"{RELEASE}.config.json"
    if not path.exists():
        _missing("CellPLM config (backbone_assets/cellplm)")
    cfg = json.loads(path.read_text())
    cfg.update(overrides)
    return cfg


def official_keys(cfg: dict, decoder: bool = True) -> dict:
    """Every ``model_state_dict`` name of the official training model -> its shape."""
    d, z, k = cfg["enc_hid"], cfg["post_latent_dim"], cfg.get("num_clusters", 16)
    n_genes = len(cfg["gene_list"])         # (the number of heads changes no shape)

    def affine(name, n):                    # GroupNorm / LayerNorm
        return {f"{name}.weight": (n,), f"{name}.bias": (n,)}

    def linear(name, n_in, n_out, bias=True):
        return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}

    keys = {}
    # OmicsEmbeddingLayer: norm0, extra_linear (Linear, ReLU, Dropout, norm), Sinusoidal2dPE, OmicsEmbedder
    keys.update(affine("embedder.norm0", d))
    keys.update(linear("embedder.extra_linear.0", d, d))
    keys.update(affine("embedder.extra_linear.3", d))
    keys["embedder.pe_enc.missing_pe"] = (d,)
    keys["embedder.pe_enc.pe_enc.weight"] = (100 * 100, d)
    keys["embedder.feat_enc.emb"] = (n_genes, d)
    # TransformerEncoder of FlowformerLayer(s)
    for i in range(cfg["enc_layers"]):
        p = f"encoder.layers.{i}"
        for proj in ("query", "key", "value", "out"):
            keys.update(linear(f"{p}.self_attn.{proj}_projection", d, d))
        keys.update(linear(f"{p}._ff_block.0", d, 2 * d))
        keys.update(linear(f"{p}._ff_block.3", 2 * d, d))
        keys.update(affine(f"{p}.norm1", d))
        keys.update(affine(f"{p}.norm2", d))
    # LatentModel: layers.0 placeholder, layers.1 GMVAE (InferenceNet)
    p = "latent.layers.1.inference"
    keys.update(linear(f"{p}.inference_qyx.0.logits", d, k))
    keys.update(linear(f"{p}.inference_qzyx.0", d + k, 512))
    keys.update(linear(f"{p}.inference_qzyx.2.mu", 512, z))
    keys.update(linear(f"{p}.inference_qzyx.2.var", 512, z))
    keys.update(linear(f"{p}.y_mu", k, z))
    keys.update(linear(f"{p}.y_var", k, z))
    keys.update(affine("pre_latent_norm.norm", d))
    if decoder:                             # NBMLPDecoder(in z, hidden dec_hid, out out_dim)
        h = cfg["dec_hid"]
        covariates = [(c, cfg.get(f"{c}_num", 0)) for c in ("batch", "dataset", "platform")]
        for i in range(cfg["dec_layers"] - 1):
            keys.update(linear(f"decoder.layers.{i}.0", z if i == 0 else h, h))
            keys[f"decoder.layers.{i}.1.weight"] = (1,)                          # PReLU
            keys.update(affine(f"decoder.layers.{i}.3", h))
            for c, n in covariates:
                if n > 0:
                    keys[f"decoder.covariate_layers.{i}.{c}.0.weight"] = (n, h)   # Embedding
                    keys[f"decoder.covariate_layers.{i}.{c}.1.weight"] = (1,)     # PReLU
                    keys.update(affine(f"decoder.covariate_layers.{i}.{c}.2", h))
        keys.update(linear("decoder.out_layer.dec_1", h, 128))
        keys.update(linear("decoder.out_layer.dec_mean.0", 128, cfg["out_dim"]))
        keys["decoder.out_layer.dec_disp"] = (cfg["out_dim"],)
    return keys


def random_state(keys: dict, seed: int = 0) -> dict:
    """Weights of sensible scale: linear layers ~ 1/sqrt(fan in), norms near 1, the gene embedding
    at the official init scale (randn x 0.005) times 10 so the input carries signal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        t = torch.randn(shape, generator=g)
        if name == "embedder.feat_enc.emb":
            t = t * 0.05
        elif name.endswith(".weight") and len(shape) == 2:
            t = t / shape[1] ** 0.5
        elif name.endswith(".weight") and len(shape) == 1 and shape != (1,):
            t = 1 + 0.1 * t                                  # norm scales
        elif shape == (1,):
            t = torch.full(shape, 0.25)                      # PReLU
        else:
            t = 0.1 * t
        state[name] = t
    return state


def save_cellplm(folder: Path, name: str = RELEASE, decoder: bool = True, seed: int = 0, state_edit=None,
                 **overrides) -> Path:
    """``folder/<name>.config.json`` + ``folder/<name>.best.ckpt``; ``state_edit(state)`` may change
    the state dict before it is saved (to make a bad checkpoint)."""
    import torch

    cfg = release_config(**{**SMALL, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.config.json").write_text(json.dumps(cfg))
    state = random_state(official_keys(cfg, decoder=decoder), seed)
    if state_edit is not None:
        state_edit(state)
    torch.save({"epoch": 1, "model_state_dict": state}, folder / f"{name}.best.ckpt")
    return folder
