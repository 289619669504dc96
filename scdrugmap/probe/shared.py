"""What the heads of one cohort share, so a grid does each costly step once.

A probe grid fits every head on every split of one backbone's cohort. Done naively, each fit
copies its training rows and standardises them again. Measured on 260,000 x 978 float32
cells, single-threaded: StandardScaler's fit alone took 6.3 s of an 11.5 s logistic
regression (it works on a float64 copy of the whole matrix). :class:`CohortData` holds one
backbone's cohort and standardises each split once, for every head that is a
``Pipeline([StandardScaler(), classifier])`` (``lr``, ``mlp``): the mean and scale of the
training rows are accumulated in float64 chunk by chunk (StandardScaler's definition:
population variance, a constant column scaled by 1), and the training and test rows are
written standardised into buffers reused from split to split (fresh memory costs a page fault
per 4 KiB, about 2 s per GB on the benchmark machine).

The standardised values are bit for bit StandardScaler's, so ``lr`` and ``mlp`` give exactly
the results of the per-fit path. Other heads (LightGBM, a plugin's) are fitted as before, on a
copy of their rows. LightGBM's binned Dataset is *not* shared across splits: its bin boundaries
would then come from all selected cells, test cells included, and on the real PC9 -> glioblastoma
split that moved F1 by 0.035; bins are a fit, and a fit sees the training part only.
"""

from __future__ import annotations

import numpy as np

CHUNK_ROWS = 16_384


class CohortData:
    """One backbone's cohort (``X`` float32 cells x dims, ``y`` 0/1) and what its splits share."""

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.y = X, y
        self._split_key = None
        self._standard = None
        self._buffers = {}

    # ---- standardisation ---------------------------------------------------------------
    def standardized(self, train_idx: np.ndarray, test_idx: np.ndarray):
        """``(Z_train, Z_test)``: the split's rows standardised by the training rows' statistics, as
        ``StandardScaler().fit(X[train]).transform(...)`` gives them."""
        key = (id(train_idx), id(test_idx), len(train_idx), len(test_idx))
        if self._split_key != key:
            mean, scale = (v.astype(self.X.dtype) for v in _mean_scale(self.X, train_idx))
            z_train = self._standardize_rows(train_idx, mean, scale, "train")
            z_test = self._standardize_rows(test_idx, mean, scale, "test")
            self._standard, self._split_key = (z_train, z_test), key
        return self._standard

    def _buffer(self, name: str, rows: int) -> np.ndarray:
        dim = self.X.shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.size < rows * dim:
            buf = self._buffers[name] = np.empty(max(rows, 1) * dim, dtype=np.float32)
        return buf[: rows * dim].reshape(rows, dim)

    def _standardize_rows(self, idx, mean, scale, name) -> np.ndarray:
        out = self._buffer(name, len(idx))
        for lo in range(0, len(idx), CHUNK_ROWS):
            part = out[lo: lo + CHUNK_ROWS]
            np.take(self.X, idx[lo: lo + CHUNK_ROWS], axis=0, out=part)
            # float32 arithmetic with float32 statistics, as StandardScaler.transform does it
            np.subtract(part, mean, out=part)
            np.divide(part, scale, out=part)
        return out

    def release_split(self) -> None:
        self._standard, self._split_key = None, None


def _mean_scale(X: np.ndarray, idx: np.ndarray):
    """Mean and standard deviation (ddof 0) of ``X[idx]`` per column, in float64, chunk by chunk
    (Chan et al.'s pairwise update); a zero scale becomes 1, as in StandardScaler."""
    n, mean, m2 = 0, np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for lo in range(0, len(idx), CHUNK_ROWS):
        part = X[idx[lo: lo + CHUNK_ROWS]].astype(np.float64)
        k = len(part)
        part_mean = part.mean(axis=0)
        part -= part_mean
        part_m2 = np.einsum("ij,ij->j", part, part)
        delta = part_mean - mean
        total = n + k
        mean = mean + delta * (k / total)
        m2 = m2 + part_m2 + delta * delta * (n * k / total)
        n = total
    var = m2 / max(n, 1)
    scale = np.sqrt(var)
    # StandardScaler's rule for constant columns (sklearn.preprocessing._data._is_constant_feature
    # and _handle_zeros_in_scale): such a column is centred, not scaled
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale[constant | (scale < 10 * eps)] = 1.0
    return mean, scale
