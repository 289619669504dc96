"""LoRA adapters on a backbone: which modules, the peft wrapping, and the check that they train.

**Targets.** ``--target-modules`` takes the groups ``attention`` (the default) and ``mlp``, each
expanded to the backbone's declared patterns (:attr:`TorchBackbone.lora_attention`,
:attr:`~TorchBackbone.lora_mlp`), or patterns of one's own: a regular expression matched
against the end of a module's dotted name from a name boundary on, so a plain name works as in
peft (``query`` matches ``encoder.layer.0.attention.self.query``). Only linear layers
(``nn.Linear`` and transformers' ``Conv1D``) are adapted. A pattern that matches none is an
error naming some of the model's linear layers. The groups leave out the modules the backbone
lists in :meth:`~TorchBackbone.lora_unused` (e.g. Geneformer's last layer, after the pooled one).

**Why a gradient check.** Published fine-tuning code has put adapters on the output projection
of PyTorch's ``nn.MultiheadAttention``, whose forward passes its raw weights to the functional
attention: the adapter is never called, gets no gradient, and "fine-tuning" trains the head
alone. Any module whose weight is read functionally, or whose output does not reach the pooled
embedding, fails the same way, silently. :func:`check_gradients` therefore runs two training
steps on a few cells before any real training and requires that every adapter parameter
received a non-zero gradient and that the adapted model's embedding then differs from the
frozen model's; otherwise it stops with an error naming the modules.

peft is imported inside functions: the package must import on the core install.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from ..errors import UserError

GROUPS = ("attention", "mlp")
ADAPTER = "default"          # peft's adapter name; one adapter at a time
CHECK_STEP = 1e-2            # size of each parameter's signed step in the gradient check


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("LoRA fine-tuning needs peft: pip install 'scdrugmap[lora]'") from None


def linear_modules(model) -> dict:
    """Name -> module of the layers LoRA can adapt (``nn.Linear``, transformers' ``Conv1D``)."""
    from torch import nn

    kinds = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except ImportError:
        pass
    return {name: m for name, m in model.named_modules() if name and isinstance(m, tuple(kinds))}


def _matches(pattern: str, name: str) -> bool:
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def resolve_targets(backbone, requested=("attention",)) -> tuple[list[str], list[str]]:
    """``(module names, patterns used)``: the backbone's linear layers that the requested groups and
    patterns select, in model order. Raises :class:`UserError` for a pattern or group that selects
    nothing."""
    requested = list(dict.fromkeys(requested or ("attention",)))
    layers = linear_modules(backbone.model)
    unused = tuple(backbone.lora_unused())
    chosen: dict[str, None] = {}
    patterns = []
    for item in requested:
        if item in GROUPS:
            group = getattr(backbone, f"lora_{item}")
            if not group:
                raise UserError(f"backbone {backbone.name!r} declares no {item} layers for LoRA: name the modules "
                                f"with --target-modules (its linear layers include {_examples(layers)})")
            found = [n for n in layers if not n.startswith(unused) and any(_matches(p, n) for p in group)]
            patterns += list(group)
        else:
            try:
                re.compile(item)
            except re.error as e:
                raise UserError(f"--target-modules {item!r} is not a valid regular expression ({e})") from None
            found = [n for n in layers if _matches(item, n)]
            patterns.append(item)
        if not found:
            what = f"the {item} layers declared by {backbone.name!r}" if item in GROUPS else f"--target-modules {item!r}"
            raise UserError(f"{what} match no linear layer of the model: its linear layers include "
                            f"{_examples(layers)} (patterns match the end of a dotted module name)")
        chosen.update(dict.fromkeys(found))
    order = {n: i for i, n in enumerate(layers)}
    return sorted(chosen, key=order.get), patterns


def _examples(layers: dict, n: int = 6) -> str:
    """A few distinct linear-layer names (layer numbers folded), e.g. 'encoder.layer.N.attention.self.query'."""
    seen = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", name) for name in layers))
    return ", ".join(seen[:n]) + (f" (+{len(seen) - n} more)" if len(seen) > n else "") if seen else "none"


def attach(backbone, targets: list[str], rank: int, alpha: float, dropout: float, seed: int):
    """Wrap ``backbone.model`` with LoRA adapters (peft) on ``targets``; the backbone's weights are
    frozen, the adapters start as peft initialises them (B = 0: the adapted model starts equal to
    the frozen one) from ``seed``. Returns the ``PeftModel``; ``backbone.model``'s modules are
    replaced in place, so the backbone's own forward (:meth:`finetune_embed`) runs the adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    conv1d = False
    try:
        from transformers.pytorch_utils import Conv1D

        layers = linear_modules(backbone.model)
        conv1d = any(isinstance(layers[t], Conv1D) for t in targets)
    except ImportError:
        pass
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", fan_in_fan_out=conv1d,
                        target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(backbone.model, config)
    model.to(backbone.device)
    set_training(model, False)
    return model


def set_training(peft_model, training: bool) -> None:
    """Training mode for the adapters' dropout only: the backbone itself stays in eval mode, as in
    extraction (its own dropout off, the only randomness is LoRA dropout)."""
    peft_model.eval()
    if training:
        for name, module in peft_model.named_modules():
            if name.endswith("lora_dropout") or ".lora_dropout." in name:
                module.train()


def adapter_parameters(peft_model) -> dict:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def adapter_state(peft_model) -> dict:
    """A copy of the adapters' weights (CPU tensors), peft's names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise UserError(f"the saved adapter does not fit this model ({len(bad)} unexpected weights, e.g. {bad[0]}): "
                        "was it trained with other --target-modules or another checkpoint?")


def save_adapter(peft_model, folder: Path) -> None:
    """peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(folder))


def read_adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{folder} holds no adapter_model.safetensors: delete the fold's folder to retrain it")
    return load_file(str(path))


def adapter_summary(peft_model) -> dict:
    params = adapter_parameters(peft_model)
    total = sum(p.numel() for p in peft_model.parameters())
    trainable = sum(p.numel() for p in params.values())
    return {"adapter_parameters": int(trainable), "backbone_parameters": int(total - trainable)}


def check_gradients(backbone, peft_model, batch, targets: list[str]) -> dict:
    """Two signed-gradient steps on ``batch``: every adapter parameter must get a non-zero gradient
    and the embedding must then differ from the frozen model's. Two steps, because peft starts B
    at zero: in the first step only B can receive a gradient, A receives one once B is non-zero.
    The loss is the embedding's projection on a fixed random direction (no head needed); no
    dropout, no autocast. The adapters are restored afterwards. Raises :class:`UserError` naming
    the modules that fail; returns facts for provenance."""
    import torch

    params = adapter_parameters(peft_model)
    if not params:
        raise UserError("LoRA added no trainable parameter: check --target-modules")
    saved = {n: p.detach().clone() for n, p in params.items()}
    set_training(peft_model, False)                    # no dropout: the check is deterministic
    # without autocast: the check is about the graph, and an fp16 gradient that underflows must not
    # pass for a missing one
    with torch.no_grad(), peft_model.disable_adapter():
        frozen = backbone.finetune_embed(batch).float()
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(frozen.shape[1:], generator=generator).to(frozen.device)
    reached = {n: False for n in params}
    try:
        for _ in range(2):
            for p in params.values():
                p.grad = None
            out = backbone.finetune_embed(batch)
            loss = (out.float() * direction).sum()
            if not loss.requires_grad:                 # no adapter is on the path to the embedding
                break
            loss.backward()
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).any()):
                        reached[n] = True
                        p -= CHECK_STEP * torch.sign(p.grad)
        with torch.no_grad():
            after = backbone.finetune_embed(batch).float()
        change = float((after - frozen).abs().max())
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
                p.grad = None
    dead = sorted({_module_of(n) for n, ok in reached.items() if not ok})
    if dead:
        shown = ", ".join(dead[:4]) + (f" (+{len(dead) - 4} more)" if len(dead) > 4 else "")
        raise UserError(f"LoRA adapters on {len(dead)} of {len(targets)} modules of {backbone.name!r} receive no "
                        f"gradient: {shown}. Their weights are read functionally (e.g. nn.MultiheadAttention's "
                        "out_proj) or their output never reaches the cell embedding, so they would not train: "
                        "choose other --target-modules")
    if not change > 0:
        raise UserError(f"the adapted {backbone.name!r} model's embedding equals the frozen model's after two "
                        "training steps: the adapters on " + ", ".join(targets[:3]) + " have no effect; choose other "
                        "--target-modules")
    return {"gradient_check": "passed", "check_cells": int(frozen.shape[0]), "check_max_change": change,
            "adapter_tensors_checked": len(params)}


def _module_of(param_name: str) -> str:
    """'base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight' -> the module's name."""
    name = param_name.split(".lora_")[0]
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def config_facts(peft_model) -> dict:
    config = peft_model.peft_config[ADAPTER]
    return json.loads(json.dumps({"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                                  "bias": config.bias, "fan_in_fan_out": config.fan_in_fan_out}, default=str))
