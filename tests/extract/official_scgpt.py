"""Random scGPT checkpoints in the official file layout and key names (test support).

The key list is written from the official code, not from scdrugmap's module: the whole-human
model was pretrained by ``dev-temp:examples/pretrain.py`` with ``TransformerModel`` of
``dev-temp:scgpt/model/model.py`` (``MVC=True``, ``n_cls=1``, flash-attention layers), which holds

* ``encoder.embedding.weight`` [ntoken, d], ``encoder.enc_norm.{weight,bias}`` (GeneEncoder);
* ``flag_encoder.weight`` [2, d] (generative-training flags, unused by the embedding);
* ``value_encoder.linear1`` [d, 1], ``.linear2`` [d, d], ``.norm`` (ContinuousValueEncoder);
* per layer ``transformer_encoder.layers.{i}.``: ``self_attn.Wqkv`` [3d, d] (flash) or
  ``self_attn.in_proj_weight``/``in_proj_bias`` (torch), ``self_attn.out_proj`` [d, d],
  ``linear1`` [d_hid, d], ``linear2`` [d, d_hid], ``norm1``, ``norm2``;
* ``decoder.fc.{0,2,4}`` (ExprDecoder: d->d, d->d, d->1) and ``mvc_decoder.gene2query`` [d, d],
  ``mvc_decoder.W.weight`` [d, d] (MVCDecoder "inner product", no bias);
* fine-tuned checkpoints (``finetuned=True``) also hold ``cls_decoder._decoder.{0,2,3,5}`` and
  ``cls_decoder.out_layer`` (ClsDecoder, ``n_layers_cls`` = 3).

``ntoken`` is the vocabulary plus the special tokens the official ``embed_data`` appends
(``<pad>``, ``<cls>``, ``<eoc>``). The same seed gives the same tensors for both attention
variants, so their embeddings must agree.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

from checkpoints import SHARED, _missing

SCGPT_ASSETS = SHARED / "backbone_assets" / "scgpt_human"
SPECIALS = ("<pad>", "<cls>", "<eoc>")


def real_args() -> dict:
    if not SCGPT_ASSETS.exists():
        _missing("scGPT assets (backbone_assets/scgpt_human)")
    return json.loads((SCGPT_ASSETS / "args.json").read_text())


def real_vocab() -> dict:
    if not SCGPT_ASSETS.exists():
        _missing("scGPT assets (backbone_assets/scgpt_human)")
    return json.loads((SCGPT_ASSETS / "default_census_vocab.json").read_text())


def official_shapes(args: dict, ntoken: int, variant: str = "flash", finetuned: bool = False) -> list:
    """``(key, shape, kind)`` of the official checkpoint, in the order the official model registers
    them; ``kind`` is ``embedding``, ``linear`` or ``norm`` (LayerNorm)."""
    d, d_hid = args["embsize"], args["d_hid"]

    def ln(p):
        return [(f"{p}.weight", (d,), "norm"), (f"{p}.bias", (d,), "norm")]

    def lin(p, out, inp, bias=True):
        return [(f"{p}.weight", (out, inp), "linear")] + ([(f"{p}.bias", (out,), "linear")] if bias else [])

    keys = [("encoder.embedding.weight", (ntoken, d), "embedding"), *ln("encoder.enc_norm"),
            ("flag_encoder.weight", (2, d), "embedding"),
            *lin("value_encoder.linear1", d, 1), *lin("value_encoder.linear2", d, d), *ln("value_encoder.norm")]
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        qkv = f"{p}.self_attn.Wqkv." if variant == "flash" else f"{p}.self_attn.in_proj_"
        keys += [(qkv + "weight", (3 * d, d), "linear"), (qkv + "bias", (3 * d,), "linear"),
                 *lin(f"{p}.self_attn.out_proj", d, d), *lin(f"{p}.linear1", d_hid, d), *lin(f"{p}.linear2", d, d_hid),
                 *ln(f"{p}.norm1"), *ln(f"{p}.norm2")]
    keys += [*lin("decoder.fc.0", d, d), *lin("decoder.fc.2", d, d), *lin("decoder.fc.4", 1, d),
             *lin("mvc_decoder.gene2query", d, d), *lin("mvc_decoder.W", d, d, bias=False)]
    if finetuned:
        for j in range(args.get("n_layers_cls", 3) - 1):      # Linear, ReLU, LayerNorm per hidden layer
            keys += [*lin(f"cls_decoder._decoder.{3 * j}", d, d), *ln(f"cls_decoder._decoder.{3 * j + 2}")]
        keys += lin("cls_decoder.out_layer", 2, d)
    return keys


def official_state_dict(args: dict, ntoken: int, variant: str = "flash", finetuned: bool = False,
                        seed: int = 0) -> OrderedDict:
    """Random tensors under the official names, at about the scale of trained weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape, kind in official_shapes(args, ntoken, variant, finetuned):
        noise = torch.randn(shape, generator=gen)
        if kind == "norm":
            state[key] = 1 + 0.1 * noise if key.endswith("weight") else 0.1 * noise
        elif kind == "embedding":
            state[key] = 0.1 * noise
        elif key.endswith("bias"):
            state[key] = 0.05 * noise
        else:
            state[key] = noise / shape[1] ** 0.5
    return state


def save_official_scgpt(folder: Path, variant: str = "flash", finetuned: bool = False, seed: int = 0,
                        **args_overrides) -> Path:
    """``best_model.pt`` + ``args.json`` + ``vocab.json`` as the release ships them: the real
    vocabulary and args.json fields, sizes overridden (e.g. a small ``embsize`` for tests)."""
    import torch

    args = {**real_args(), **args_overrides}
    vocab = real_vocab()
    ntoken = len(vocab) + sum(t not in vocab for t in SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCGPT_ASSETS / "default_census_vocab.json", folder / "vocab.json")
    (folder / "args.json").write_text(json.dumps(args))
    torch.save(official_state_dict(args, ntoken, variant, finetuned, seed), folder / "best_model.pt")
    return folder
