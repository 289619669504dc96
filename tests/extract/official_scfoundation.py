"""scFoundation's ``models.ckpt`` layout with random weights, for tests and benchmarks.

The key names and shapes are written out here from the official code
(github.com/biomap-research/scFoundation, ``model/pretrainmodels/``: ``MaeAutobin`` with
``AutoDiscretizationEmbedding2``, ``pytorchTransformerModule`` over ``nn.TransformerEncoderLayer``,
and ``PerformerModule`` -> ``Performer`` -> ``SequentialSequence`` of
``[PreLayerNorm(SelfAttention), PreLayerNorm(Chunk(FeedForward))]``), not taken from scdrugmap's
module, so that a naming mistake there shows up as a failed strict load. The file layout follows
``model/load.py::load_model_frommmf``/``convertconfig``: a dict with the entries ``gene``,
``cell`` and ``rde``, each ``{"config": ..., "state_dict": {"model.<key>": tensor}}``.

Needs neither pytest nor conftest (benchmarks use it too).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from checkpoints import SHARED, _missing

GENE_INDEX = SHARED / "backbone_assets" / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"
N_GENES = 19264


def official_config(hidden=64, depth=2, heads=4, dec_hidden=32, dec_depth=1, dec_heads=2, dec_dim_head=16,
                    bin_num=100, seq_len=N_GENES + 2) -> dict:
    """A Lightning-style config as the release's: ``model_config[model]`` plus ``dataset_config.rnaseq``.

    Defaults: a small random model; the released one is 768/12/12 with a 512/6/8 (dim_head 64) decoder.
    """
    model = {
        "encoder": {"hidden_dim": hidden, "depth": depth, "heads": heads, "dim_head": hidden // heads,
                    "module_type": "transformer", "norm_first": False},
        "decoder": {"hidden_dim": dec_hidden, "depth": dec_depth, "heads": dec_heads, "dim_head": dec_dim_head,
                    "module_type": "performer"},
        "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": bin_num, "bin_alpha": 1.0,
        "seq_len": seq_len, "gene_num": seq_len, "mae_encoder_max_seq_len": 15000,
    }
    return {"model": "mae_autobin", "model_config": {"mae_autobin": model},
            "dataset_config": {"rnaseq": {"bin_num": bin_num, "bin_type": "auto_bin", "seq_len": seq_len}}}


def official_shapes(config: dict) -> dict:
    """Every key of MaeAutobin's state_dict (without the ``model.`` prefix) and its shape."""
    c = {**config["model_config"][config["model"]], **config["dataset_config"]["rnaseq"]}
    enc, dec = c["encoder"], c["decoder"]
    D, B, L = enc["hidden_dim"], c["bin_num"], c["seq_len"]
    d, dh = dec["hidden_dim"], dec["dim_head"]
    inner = dec["heads"] * dh
    nb = int(dh * math.log(dh))              # FastAttention: nb_features = int(dim_heads * ln(dim_heads))
    shapes = {
        "token_emb.mlp.weight": (B, 1), "token_emb.mlp.bias": (B,),
        "token_emb.mlp2.weight": (B, B), "token_emb.mlp2.bias": (B,),
        "token_emb.emb.weight": (B, D), "token_emb.emb_mask.weight": (1, D), "token_emb.emb_pad.weight": (1, D),
        "pos_emb.weight": (L + 1, D),
    }
    for i in range(enc["depth"]):            # nn.TransformerEncoderLayer(D, heads, 4 * D)
        p = f"encoder.transformer_encoder.{i}."
        shapes.update({p + "self_attn.in_proj_weight": (3 * D, D), p + "self_attn.in_proj_bias": (3 * D,),
                       p + "self_attn.out_proj.weight": (D, D), p + "self_attn.out_proj.bias": (D,),
                       p + "linear1.weight": (4 * D, D), p + "linear1.bias": (4 * D,),
                       p + "linear2.weight": (D, 4 * D), p + "linear2.bias": (D,),
                       p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,), p + "norm2.bias": (D,)})
    shapes.update({"encoder.norm.weight": (D,), "encoder.norm.bias": (D,)})
    for i in range(dec["depth"]):
        p = f"decoder.performer.net.layers.{i}."
        shapes.update({p + "0.norm.weight": (d,), p + "0.norm.bias": (d,)})
        for name in ("to_q", "to_k", "to_v"):
            shapes.update({p + f"0.fn.{name}.weight": (inner, d), p + f"0.fn.{name}.bias": (inner,)})
        shapes.update({p + "0.fn.to_out.weight": (d, inner), p + "0.fn.to_out.bias": (d,),
                       p + "0.fn.fast_attention.projection_matrix": (nb, dh),
                       p + "1.norm.weight": (d,), p + "1.norm.bias": (d,),
                       p + "1.fn.fn.w1.weight": (4 * d, d), p + "1.fn.fn.w1.bias": (4 * d,),
                       p + "1.fn.fn.w2.weight": (d, 4 * d), p + "1.fn.fn.w2.bias": (d,)})
    shapes.update({"decoder.performer.calls_since_last_redraw": (), "decoder.norm.weight": (d,),
                   "decoder.norm.bias": (d,), "decoder_embed.weight": (d, D), "decoder_embed.bias": (d,),
                   "norm.weight": (d,), "norm.bias": (d,), "to_final.weight": (1, d), "to_final.bias": (1,)})
    return shapes


def random_state_dict(config: dict, seed: int = 0) -> dict:
    """Random tensors under the official names, ``model.`` prefix included (as in models.ckpt)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes(config).items():
        if key.endswith("calls_since_last_redraw"):
            value = torch.tensor(0)
        elif ".norm" in key and key.endswith("weight"):             # LayerNorm gains near 1
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(("bias", "emb.weight", "emb_mask.weight", "emb_pad.weight", "projection_matrix")):
            value = 0.5 * torch.randn(shape, generator=g)
        else:                                                        # weights: variance ~ 1 / fan-in
            value = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out["model." + key] = value
    return out


def save_scfoundation(folder: Path, gene_index: bool = True, seeds=None, **config) -> Path:
    """``folder/models.ckpt`` (entries gene, cell, rde; different random weights each) and, unless
    ``gene_index=False``, the real gene index beside it."""
    import torch

    if not GENE_INDEX.exists():
        _missing("scFoundation gene index (backbone_assets/scfoundation)")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = official_config(**config)
    seeds = seeds or {"gene": 1, "cell": 0, "rde": 2}
    torch.save({entry: {"config": cfg, "state_dict": random_state_dict(cfg, seed)} for entry, seed in seeds.items()},
               folder / "models.ckpt")
    if gene_index:
        shutil.copy(GENE_INDEX, folder / GENE_INDEX.name)
    return folder
