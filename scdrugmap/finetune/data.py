"""The cohort's cells as model input, the batches they are trained and scored in, and the
validation part carved out of a training fold.

Cells are read from the verified source files (the store keeps no counts) and turned into the
backbone's input by its own :meth:`~TorchBackbone.finetune_cells` (for token models: its cell
tokenizer, as in extraction). Position ``k`` of :class:`CohortCells` is row ``k`` of the store's
``cells`` frame of the cohort (store order), the positions the probe splits use.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from ..extract.engine import length_sorted_batches

READ_ROWS = 4096              # source rows read at a time
SORT_WINDOW = 50              # training: cells are length-sorted within windows of 50 batches


def read_rows(source, rows: np.ndarray, step: int = READ_ROWS) -> sp.csr_matrix:
    """The source rows ``rows`` (sorted, unique) as one CSR block, reading ``step`` rows at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = []
    for lo in range(int(rows[0]) if len(rows) else 0, int(rows[-1]) + 1 if len(rows) else 0, step):
        hi = lo + step
        a, b = np.searchsorted(rows, [lo, hi])
        if a == b:
            continue
        block = sp.csr_matrix(source.rows(lo, min(hi, source.n_cells)))
        parts.append(block[rows[a:b] - lo])
    if not parts:
        return sp.csr_matrix((0, 0))
    return sp.csr_matrix(sp.vstack(parts))


class CohortCells:
    """Every cell of the cohort, prepared by the backbone; item ``k`` is ``(k, inputs)``."""

    def __init__(self, backbone, sources: dict, cells):
        self.parts, starts = [], []
        offset = 0
        names = cells["dataset"].to_numpy()
        rows = cells["row"].to_numpy()
        for name in dict.fromkeys(names):                 # datasets in store order
            mine = rows[names == name]
            part = backbone.finetune_cells(sources[name], read_rows(sources[name], mine))
            self.parts.append(part)
            starts.append(offset)
            offset += len(mine)
        self.starts = np.array(starts, dtype=np.int64)
        self.n = offset
        self.lengths = np.concatenate([np.asarray(p.lengths()) for p in self.parts]) if self.parts \
            else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        j = int(np.searchsorted(self.starts, k, side="right")) - 1
        _, item = self.parts[j][int(k - self.starts[j])]
        return int(k), item


def training_batches(indices, lengths, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar token counts: the cells are shuffled, cut into windows of
    ``SORT_WINDOW`` batches, length-sorted within each window (the engine's length-aware batching,
    so little of a batch is padding), and the batches shuffled."""
    order = rng.permutation(np.asarray(indices, dtype=np.int64))
    batches = []
    for start in range(0, len(order), batch_size * SORT_WINDOW):
        pool = order[start:start + batch_size * SORT_WINDOW]
        batches += [pool[b].tolist() for b in length_sorted_batches(lengths[pool], batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def evaluation_batches(indices, lengths, batch_size: int) -> list[list[int]]:
    """Length-sorted batches over ``indices`` (store order among equal lengths)."""
    indices = np.asarray(indices, dtype=np.int64)
    return [indices[b].tolist() for b in length_sorted_batches(lengths[indices], batch_size)]


def loader(cells, batches, collate, workers: int = 0, pin: bool = False):
    from torch.utils.data import DataLoader

    return DataLoader(cells, batch_sampler=batches, collate_fn=collate, num_workers=workers, pin_memory=pin)


def validation_split(y: np.ndarray, groups, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(fit, validation, how)``: positions into a training part. Grouped (whole groups in the
    validation part) when ``groups`` is given and each class spans at least 2 groups: 1/k of the
    groups with k = min(1 / fraction, groups of the smallest class), seeded stratified
    (``StratifiedGroupKFold``). Otherwise a seeded stratified cell-level split of ``fraction``.
    Both parts must hold both classes; with too few cells there is no validation part."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    y = np.asarray(y)
    n = len(y)
    everything = (np.arange(n), np.array([], dtype=np.int64))
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        per_class = min(len(np.unique(groups[y == c])) for c in (0, 1))
        if per_class >= 2:
            k = max(2, min(int(round(1 / fraction)), per_class))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit, val = next(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                                .split(np.zeros((n, 1)), y, groups))
            if _both(y[fit]) and _both(y[val]):
                return fit, val, f"{len(np.unique(groups[val]))} of {len(np.unique(groups))} groups held out"
    counts = np.bincount(y, minlength=2)
    n_val = max(2, int(round(fraction * n)))
    if counts.min() >= 2 and n - n_val >= 2:
        split = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        fit, val = next(split.split(np.zeros((n, 1)), y))
        if _both(y[fit]) and _both(y[val]):
            return np.sort(fit), np.sort(val), f"{len(val)} of {n} cells (cell-level, stratified)"
    return (*everything, "none: too few cells for a validation part with both classes; the last epoch is kept")


def _both(y) -> bool:
    return len(np.unique(y)) == 2
