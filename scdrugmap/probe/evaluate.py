"""Fit a fresh head per split and score it on the held-out cells.

Degenerate splits are recorded, not crashed on: a training part with one class
cannot fit a classifier (``status="one-class-train"``, skipped), and a test part
with one class is scored with the metrics that stay defined
(``status="one-class-test"``; AUROC, AUPRC and MCC are NaN).
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from scdrugmap.errors import UserError
from scdrugmap.probe.heads import make_head
from scdrugmap.probe.metrics import score
from scdrugmap.probe.splits import Split

POSITIVE = 1  # resistant


def _check_inputs(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-d (cells x dims), got shape {X.shape}")
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    y = np.asarray(y)
    if y.shape != (X.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({X.shape[0]},)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must be 0/1 with 1 = resistant")
    y = y.astype(np.int64)
    # in row chunks: a full boolean mask of 326k x 1000 would cost ~300 MB
    bad = sum(
        int((~np.isfinite(X[i : i + 65536])).any(axis=1).sum())
        for i in range(0, X.shape[0], 65536)
    )
    if bad:
        raise UserError(
            f"{bad} cell embeddings contain NaN or infinite values; "
            "re-extract those embeddings or filter the cells out"
        )
    return X, y


def _one_split(X, y, split: Split, head: str, seed: int, params: dict, n_threads: int) -> dict:
    y_train, y_test = y[split.train_idx], y[split.test_idx]
    record = {
        "split": split.name,
        "n_train": int(len(split.train_idx)),
        "n_test": int(len(split.test_idx)),
        "n_train_pos": int(y_train.sum()),
        "n_test_pos": int(y_test.sum()),
        "status": "ok",
        "reason": "",
        "note": split.note,
        "fit_seconds": None,
        "metrics": None,
        "warnings": [],
    }
    if len(np.unique(y_train)) < 2:
        record["status"] = "one-class-train"
        record["reason"] = (
            f"training part has only class {int(y_train[0]) if len(y_train) else 'none'}; "
            "no classifier can be fitted, split skipped"
        )
        return record

    estimator = make_head(head, seed, n_threads, **params)
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=n_threads):
        warnings.simplefilter("always")
        start = time.perf_counter()
        estimator.fit(X[split.train_idx], y_train)
        record["fit_seconds"] = time.perf_counter() - start
        column = list(estimator.classes_).index(POSITIVE)
        proba = estimator.predict_proba(X[split.test_idx])[:, column]
    # keep each distinct warning once instead of spamming the console per split
    record["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))

    record["metrics"] = score(y_test, proba, positive=POSITIVE)
    if len(np.unique(y_test)) < 2:
        record["status"] = "one-class-test"
        record["reason"] = (
            f"test part has only class {int(y_test[0])}; AUROC, AUPRC and MCC are undefined (NaN)"
        )
    return record


def evaluate(
    X,
    y,
    splits: Sequence[Split],
    head: str,
    seed: int = 0,
    head_params: Optional[dict] = None,
    progress: Optional[Callable[[dict], object]] = None,
    n_threads: int = 1,
    n_jobs: int = 1,
) -> list[dict]:
    """Evaluate ``head`` on every split; one record per split, in split order.

    ``y`` is 0/1 with 1 = resistant. ``progress``, if given, is called as
    ``progress(record)`` after each split. Each record has ``split``, ``n_train``,
    ``n_test``, ``n_train_pos``, ``n_test_pos``, ``status``, ``reason``, ``note``
    (from the split), ``fit_seconds``, ``metrics`` (None when skipped) and
    ``warnings`` (distinct warning messages raised while fitting).

    ``n_threads`` caps each fit's threads (LightGBM, BLAS); more cores are used by
    ``n_jobs`` worker processes, each fitting whole splits (joblib; large ``X`` is
    memory-mapped, not copied). Results do not depend on ``n_jobs``.
    """
    X, y = _check_inputs(X, y)
    params = dict(head_params or {})
    if n_threads < 1:
        raise UserError(f"n_threads must be at least 1, got {n_threads}")
    if n_jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {n_jobs}")
    make_head(head, seed, n_threads, **params)  # fail on a bad head/parameter before any fitting
    if n_jobs == 1:
        outputs = (_one_split(X, y, split, head, seed, params, n_threads) for split in splits)
    else:
        from joblib import Parallel, delayed

        outputs = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_one_split)(X, y, split, head, seed, params, n_threads) for split in splits
        )
    records = []
    for record in outputs:
        records.append(record)
        if progress is not None:
            progress(record)
    return records
