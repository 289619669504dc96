"""The training loop of one fold: LoRA adapters and a classification head, trained together.

* **Head** (:class:`head module <make_head>`): the probes' ``mlp`` head in torch: the pooled
  embedding standardised per dimension (mean and standard deviation of the *frozen* embedding
  over up to 2,048 of the fold's training cells, as the probes' ``StandardScaler``; fixed
  during training), then Linear(dim, 256), ReLU, Linear(256, 64), ReLU, Linear(64, 2). The same
  architecture as the frozen ``mlp`` probe, so a ``lora`` row and a ``frozen`` ``mlp`` row of the
  leaderboard differ by the fine-tuning, not by the head.
* **Loss**: cross-entropy with balanced class weights (n / (2 n_class) over the fitted cells),
  as the probes' ``class_weight="balanced"``.
* **Optimiser**: AdamW (weight decay 0.01) over the adapters and the head, one learning rate,
  gradient norm clipped at 1; ``grad_accum`` batches per step.
* **Precision**: the backbone's autocast (bf16 on CUDA, fp32 on CPU; fp16 gets a gradient
  scaler); the head runs in fp32.
* **Early stopping**: after each epoch the validation part (carved from the training fold,
  :func:`~scdrugmap.finetune.data.validation_split`) is scored with the balanced loss; the
  adapters and head of the best epoch are kept, and training stops after ``patience`` epochs
  without improvement. The test fold is never seen here.
* **Determinism**: the fold's seed sets the head's initialisation, the batch order and LoRA
  dropout; the backbone's own dropout stays off (eval mode, as in extraction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import adapters
from .data import evaluation_batches, loader, training_batches

STATS_CELLS = 2048
HIDDEN = (256, 64)


@dataclass
class TrainSettings:
    epochs: int = 5
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum: int = 1
    patience: int = 2
    max_grad_norm: float = 1.0
    workers: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FoldReport:
    epochs_run: int = 0
    best_epoch: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    cells_trained: int = 0          # cell passes with a backward pass
    samples_per_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def make_head(dim: int, mean, std, seed: int):
    """Standardisation (fixed) + the probes' (256, 64) ReLU MLP -> 2 logits (class 1 = positive)."""
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, dim))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, dim))
            layers, width = [], dim
            for hidden in HIDDEN:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            self.net = nn.Sequential(*layers, nn.Linear(width, 2))

        def forward(self, x):
            return self.net((x.float() - self.mean) / self.std)

    torch.manual_seed(seed)
    return Head()


def embed(backbone, cells, indices, batch_size: int, workers: int = 0, grad: bool = False):
    """Embeddings of ``cells[indices]`` in the order of ``indices`` (a float32 tensor on the device)."""
    import torch

    batches = evaluation_batches(indices, cells.lengths, batch_size)
    where = {int(k): i for i, k in enumerate(indices)}
    out = None
    with torch.set_grad_enabled(grad):
        for batch in loader(cells, batches, backbone.finetune_collate(), workers, backbone.on_cuda):
            with backbone.autocast():
                emb = backbone.finetune_embed(batch)
            emb = emb.float()
            if out is None:
                out = torch.empty((len(indices), emb.shape[1]), dtype=torch.float32, device=emb.device)
            out[[where[int(k)] for k in batch[0]]] = emb
    return out


def standardisation(backbone, cells, train_idx, batch_size: int, seed: int, workers: int = 0):
    """Per-dimension mean and std of the frozen embedding over up to ``STATS_CELLS`` training cells
    (std 1 where a dimension is constant, as StandardScaler)."""
    import torch

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(train_idx, size=min(STATS_CELLS, len(train_idx)), replace=False))
    X = embed(backbone, cells, sample, batch_size, workers).cpu().double()
    mean, std = X.mean(0), X.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.float(), std.float()


def class_weights(y: np.ndarray):
    import torch

    counts = np.bincount(y, minlength=2).astype(np.float64)
    return torch.tensor(len(y) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


def validation_loss(backbone, head, cells, val_idx, y, batch_size, workers) -> tuple[float, float]:
    """Balanced cross-entropy and balanced accuracy of the validation cells."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = head(embed(backbone, cells, val_idx, batch_size, workers))
    target = torch.as_tensor(y[val_idx], device=logits.device)
    loss = F.cross_entropy(logits, target, weight=class_weights(y[val_idx]).to(logits.device))
    pred = logits.argmax(1).cpu().numpy()
    truth = y[val_idx]
    balanced = float(np.mean([np.mean(pred[truth == c] == c) for c in (0, 1) if (truth == c).any()]))
    return float(loss), balanced


def train_fold(backbone, peft_model, head, cells, y: np.ndarray, fit_idx, val_idx, settings: TrainSettings,
               seed: int, progress=None) -> FoldReport:
    """Trains ``peft_model``'s adapters and ``head`` in place; leaves the best epoch's weights."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = list(adapters.adapter_parameters(peft_model).values()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    device_type = "cuda" if backbone.on_cuda else "cpu"
    scaler = torch.amp.GradScaler(device_type, enabled=backbone.precision == "fp16")
    weights = class_weights(y[fit_idx]).to(backbone.device)
    labels = torch.as_tensor(y, dtype=torch.long)
    report = FoldReport()
    best, best_state, stale = float("inf"), None, 0
    start = time.perf_counter()
    train_seconds = 0.0
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        adapters.set_training(peft_model, True)
        head.train()
        batches = training_batches(fit_idx, cells.lengths, settings.batch_size, rng)
        total, seen = 0.0, 0
        optimiser.zero_grad(set_to_none=True)
        for step, batch in enumerate(loader(cells, batches, backbone.finetune_collate(), settings.workers,
                                            backbone.on_cuda), start=1):
            index = batch[0]
            with backbone.autocast():
                emb = backbone.finetune_embed(batch)
            logits = head(emb.float())
            target = labels[index].to(logits.device)
            loss = F.cross_entropy(logits, target, weight=weights)
            scaler.scale(loss / settings.grad_accum).backward()
            if step % settings.grad_accum == 0 or step == len(batches):
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                scaler.step(optimiser)
                scaler.update()
                optimiser.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(index)
            seen += len(index)
            if progress:
                progress(len(index))
        adapters.set_training(peft_model, False)
        head.eval()
        train_seconds += time.perf_counter() - t0
        report.cells_trained += seen
        entry = {"epoch": epoch, "train_loss": round(total / max(seen, 1), 5)}
        if len(val_idx):
            loss, balanced = validation_loss(backbone, head, cells, val_idx, y, settings.batch_size, settings.workers)
            entry.update(val_loss=round(loss, 5), val_balanced_accuracy=round(balanced, 4))
            improved = loss < best
        else:
            loss, improved = 0.0, True            # no validation part: the last epoch is kept
        report.history.append(entry)
        report.epochs_run = epoch
        if improved:
            best, stale, report.best_epoch = loss, 0, epoch
            best_state = (adapters.adapter_state(peft_model), {k: v.detach().clone() for k, v in head.state_dict().items()})
        else:
            stale += 1
            if stale >= settings.patience:
                break
    if best_state is not None:
        adapters.load_adapter_state(peft_model, best_state[0])
        head.load_state_dict(best_state[1])
    report.seconds = time.perf_counter() - start
    report.samples_per_s = report.cells_trained / train_seconds if train_seconds else 0.0
    return report


def predict(backbone, head, cells, indices, batch_size: int, workers: int = 0) -> np.ndarray:
    """Probability of class 1 (the positive class) for ``cells[indices]``, in that order."""
    import torch

    head.eval()
    with torch.no_grad():
        logits = head(embed(backbone, cells, indices, batch_size, workers))
    return torch.softmax(logits.double(), dim=1)[:, 1].cpu().numpy()
