"""Fit a fresh head per split and score it on the held-out cells; several heads share each
split's preparation (:mod:`.shared`).

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
from scdrugmap.probe.shared import CohortData
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


def _record(split: Split, y_train, y_test) -> dict:
    return {
        "split": split.name,
        "n_train": int(len(split.train_idx)),
        "n_test": int(len(split.test_idx)),
        "n_train_pos": int(y_train.sum()),
        "n_test_pos": int(y_test.sum()),
        "status": "ok",
        "reason": "",
        "note": split.note,
        "fit_seconds": None,
        "seconds": 0.0,
        "metrics": None,
        "warnings": [],
    }


def _fit_predict(data: CohortData, split: Split, head: str, seed: int, params: dict, n_threads: int):
    """Fit ``head`` on the split's training rows; (probability of POSITIVE on its test rows, fit seconds).

    Heads that are ``Pipeline([StandardScaler(), classifier])`` fit their classifier on the
    split's rows standardised once for all such heads (:mod:`.shared`); any other head (LightGBM
    included: its bins must come from the training part alone) on a copy of its rows."""
    estimator = make_head(head, seed, n_threads, **params)
    y_train = data.y[split.train_idx]
    if _standard_pipeline(estimator):
        z_train, z_test = data.standardized(split.train_idx, split.test_idx)
        final = estimator.steps[-1][1]
        start = time.perf_counter()
        final.fit(z_train, y_train)
        seconds = time.perf_counter() - start
        return final.predict_proba(z_test)[:, list(final.classes_).index(POSITIVE)], seconds
    start = time.perf_counter()
    estimator.fit(data.X[split.train_idx], y_train)
    seconds = time.perf_counter() - start
    return estimator.predict_proba(data.X[split.test_idx])[:, list(estimator.classes_).index(POSITIVE)], seconds


def _standard_pipeline(estimator) -> bool:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(estimator, Pipeline) or len(estimator.steps) != 2:
        return False
    scaler = estimator.steps[0][1]
    return type(scaler) is StandardScaler and scaler.get_params() == StandardScaler().get_params()


def _split_heads(data: CohortData, split: Split, heads: Sequence[str], seed: int, head_params: dict,
                 n_threads: int) -> list[dict]:
    """One record per head for one split (heads share the split's standardised rows)."""
    y_train, y_test = data.y[split.train_idx], data.y[split.test_idx]
    records = []
    for head in heads:
        start = time.perf_counter()
        record = _record(split, y_train, y_test)
        records.append(record)
        if len(np.unique(y_train)) < 2:
            record["status"] = "one-class-train"
            record["reason"] = (
                f"training part has only class {int(y_train[0]) if len(y_train) else 'none'}; "
                "no classifier can be fitted, split skipped"
            )
            continue
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=n_threads):
            warnings.simplefilter("always")
            proba, record["fit_seconds"] = _fit_predict(data, split, head, seed, head_params.get(head) or {},
                                                        n_threads)
        # keep each distinct warning once instead of spamming the console per split
        record["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        record["metrics"] = score(y_test, proba, positive=POSITIVE)
        record["proba"] = np.asarray(proba, dtype=np.float32)  # out of fold, in split.test_idx order
        if len(np.unique(y_test)) < 2:
            record["status"] = "one-class-test"
            record["reason"] = (
                f"test part has only class {int(y_test[0])}; AUROC, AUPRC and MCC are undefined (NaN)"
            )
        record["seconds"] = time.perf_counter() - start
    data.release_split()
    return records


# a worker process keeps the cohort of the memory-mapped X it last saw (its standardisation
# buffers) for the next split of the same grid
_WORKER_DATA: dict = {}


def _worker_split(X, y, split, heads, seed, head_params, n_threads) -> list[dict]:
    key = (getattr(X, "filename", None), X.shape, id(X) if getattr(X, "filename", None) is None else 0)
    data = _WORKER_DATA.get(key)
    if data is None:
        _WORKER_DATA.clear()
        data = _WORKER_DATA[key] = CohortData(X, y)
    return _split_heads(data, split, heads, seed, head_params, n_threads)


def evaluate_heads(
    X,
    y,
    splits: Sequence[Split],
    heads: Sequence[str],
    seed: int = 0,
    head_params: Optional[dict] = None,
    progress: Optional[Callable[[str, int, dict], object]] = None,
    n_threads: int = 1,
    n_jobs: int = 1,
) -> dict[str, list[dict]]:
    """Evaluate every head of ``heads`` on every split: ``{head: [record per split, in split order]}``.

    ``head_params`` maps a head to its parameters. ``progress(head, split_index, record)`` is
    called as each record arrives (in any order when ``n_jobs`` > 1). With ``n_jobs`` > 1 the
    splits are fitted by worker processes (joblib), each fitting all heads of a split; pass
    ``X`` as an ``np.memmap`` (the grid does) so that workers map it instead of receiving a
    copy. Results do not depend on ``n_jobs``.
    """
    X, y = _check_inputs(X, y)
    params = {head: dict((head_params or {}).get(head) or {}) for head in heads}
    if n_threads < 1:
        raise UserError(f"n_threads must be at least 1, got {n_threads}")
    if n_jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {n_jobs}")
    for head in heads:
        make_head(head, seed, n_threads, **params[head])  # a bad head/parameter fails before any fitting
    out = {head: [None] * len(splits) for head in heads}
    if n_jobs == 1 or len(splits) < 2:
        data = CohortData(X, y)
        outputs = ((i, _split_heads(data, split, heads, seed, params, n_threads)) for i, split in enumerate(splits))
    else:
        from joblib import Parallel, delayed

        def task(i, split):
            return i, _worker_split(X, y, split, heads, seed, params, n_threads)

        outputs = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(task)(i, split) for i, split in enumerate(splits))
    with warnings.catch_warnings():
        # loky restarts a worker whose memory grew between tasks (its leak guard), and says so; a
        # worker here keeps its split buffers on purpose, and a restarted one only makes them again
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given",
                                category=UserWarning)
        for i, records in outputs:
            for head, record in zip(heads, records):
                out[head][i] = record
                if progress is not None:
                    progress(head, i, record)
    return out


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
    (from the split), ``fit_seconds``, ``seconds`` (the head's whole share of the split:
    preparation, fit, prediction, scoring), ``metrics`` (None when skipped) and
    ``warnings`` (distinct warning messages raised while fitting).

    ``n_threads`` caps each fit's threads (LightGBM, BLAS); more cores are used by
    ``n_jobs`` worker processes, each fitting whole splits. Results do not depend on ``n_jobs``.
    """
    records = evaluate_heads(X, y, splits, [head], seed=seed, head_params={head: head_params or {}},
                             progress=None if progress is None else (lambda _h, _i, record: progress(record)),
                             n_threads=n_threads, n_jobs=n_jobs)
    return records[head]
