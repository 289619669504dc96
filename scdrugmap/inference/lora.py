"""Predicting with a stored LoRA fine-tuning run (``scdrugmap predict --model <run_id>``).

A run of ``scdrugmap finetune`` keeps, per fold, the LoRA adapters and the head trained on that
fold (``finetune/<run_id>/fold-<k>/``); no adapter was trained on the whole cohort. A new
dataset's cells are therefore scored by every fold's adapters and head, and their probabilities
averaged (the cross-fitted folds as an ensemble). This needs what the run needed: the
backbone's checkpoint (``--model-dir``; its sha256 must be the run's), torch and peft, and the
dataset's source file (the cells go through the backbone again). The backbone's options are
those recorded with the run, so its preprocessing is the run's; any difference in the
backbone's parameters is refused, as for frozen heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..store.common import sha256_file
from ..store.store import Store
from .params import canonical as _canonical

FOLDER = "finetune"
RUN_SETTINGS = ("workers", "batch_size")


def lora_run(store: Store, name: str) -> dict | None:
    """The ``probe_runs`` row of LoRA run ``name`` whose folds are in the store, or None."""
    frame = store.sql("SELECT * FROM probe_runs WHERE run_id = ? AND method = 'lora'", [name])
    if frame.empty:
        return None
    return frame.iloc[0].to_dict()


def fold_probabilities(store: Store, run: dict, dataset: str, cells, model_dir, device: str = "cpu",
                       batch_size: int | None = None) -> tuple[np.ndarray, dict]:
    """``(P, facts)``: ``P[k, i]`` the probability of the run's positive class for cell ``i`` of
    ``cells`` (rows of ``dataset``) under fold ``k + 1``'s adapters and head."""
    from ..extract import registry
    from ..extract.runner import _sources
    from ..finetune import adapters
    from ..finetune.data import CohortCells
    from ..finetune.run import HEAD_FILE, _load_fold
    from ..finetune.train import predict as head_predict

    params = json.loads(run["params"])
    backbone = run["backbone"]
    run_dir = store.path / FOLDER / run["run_id"]
    folds = sorted((p for p in run_dir.glob("fold-*") if (p / "done").is_file()), key=lambda p: int(p.name[5:]))
    expected = len(params.get("folds") or [])
    if not folds or len(folds) != expected:
        raise UserError(f"LoRA run {run['run_id']} has {len(folds)} of its {expected} folds in {FOLDER}/: its adapters "
                        "are not (all) in this store; predict where the run was made, or rerun 'scdrugmap finetune'")
    if model_dir is None:
        raise UserError(f"model {run['run_id']!r} is a LoRA run of {backbone}: pass --model-dir with the backbone's "
                        "checkpoint (the one it was fine-tuned from)")
    adapters.require_peft()
    cls = registry.get(backbone)
    ok, why = cls.availability()
    if not ok:
        raise UserError(f"backbone {backbone!r} cannot run here: {why}")
    stored = params.get("backbone_params") or {}
    options = {k: stored[k] for k in cls.options if k in stored and k not in RUN_SETTINGS}
    model = cls(model_dir=Path(model_dir), device=device, batch_size=batch_size or cls.default_batch_size,
                options=options)
    sha = model.checkpoint_sha256()
    if sha != params.get("checkpoint_sha256"):
        raise UserError(f"--model-dir {model_dir} holds checkpoint {str(sha)[:12]}, LoRA run {run['run_id']} was "
                        f"fine-tuned from checkpoint {str(params.get('checkpoint_sha256'))[:12]}: give that checkpoint")
    mine = json.loads(json.dumps(model.params(), default=str))
    differ = sorted(k for k in set(mine) | set(stored) if k not in RUN_SETTINGS
                    and _canonical(mine.get(k)) != _canonical(stored.get(k)))
    if differ:
        raise UserError(f"backbone {backbone} here has other parameters than when LoRA run {run['run_id']} was made "
                        f"({', '.join(differ[:5])}): use the same scdrugmap version and checkpoint files")
    lora = params["lora"]
    for fold in folds:                                  # the adapters as the run saved them
        recorded = json.loads((fold / "provenance.json").read_text()).get("adapter_sha256")
        if recorded != sha256_file(fold / "adapter" / "adapter_model.safetensors") or not (fold / HEAD_FILE).is_file():
            raise UserError(f"{FOLDER}/{run['run_id']}/{fold.name} is damaged (its adapter's sha256 differs from its "
                            "provenance.json, or its head is missing): restore the store from its pack")
    [source] = _sources(store, [dataset])
    try:
        cls.check_values([source])
        data = CohortCells(model, {dataset: source}, cells)
        peft_model = adapters.attach(model, lora["targets"], lora["rank"], lora["alpha"], lora["dropout"], 0)
        adapters.set_training(peft_model, False)
        idx = np.arange(len(cells))
        batch = model.batch_size
        out = np.empty((len(folds), len(cells)))
        for k, fold in enumerate(folds):
            head = _load_fold(peft_model, model, fold)
            out[k] = head_predict(model, head, data, idx, batch, int(model.config.get("workers", 0) or 0))
    finally:
        source.close()
    return out, {"folds": len(folds), "checkpoint_sha256": sha}
