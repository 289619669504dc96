"""Binary classification metrics for drug response (positive class = resistant).

F1 of the positive class is the headline metric (as in scDrugMap). Threshold
metrics are computed from the confusion counts, so nothing warns:

* precision, recall, F1 with a zero denominator are 0 (sklearn's
  ``zero_division=0``): a head that never predicts "resistant" scores 0, not NaN;
* macro F1 averages the classes seen in truth or prediction (sklearn's default);
* balanced accuracy averages recall over the classes present in ``y_true``;
* MCC is 0 when predictions are constant (sklearn's convention) and NaN when
  ``y_true`` has one class, where it is undefined;
* AUROC and AUPRC are NaN when ``y_true`` has one class.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRICS = (
    "f1",
    "macro_f1",
    "auroc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "mcc",
    "precision",
    "recall",
)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def score(y_true, y_score, positive=1, threshold: float = 0.5) -> dict:
    """Score predicted probabilities of ``positive`` against true labels.

    A cell is predicted positive when ``y_score >= threshold``. Returns the
    metrics in :data:`METRICS` plus ``n`` (cells) and ``n_pos`` (true positives).
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=float)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be equal 1-d shapes")
    if len(y_true) == 0:
        raise ValueError("no cells to score")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinite values")

    truth = y_true == positive
    pred = y_score >= threshold
    tp = int(np.sum(truth & pred))
    fp = int(np.sum(~truth & pred))
    fn = int(np.sum(truth & ~pred))
    tn = int(np.sum(~truth & ~pred))
    n, n_pos = len(truth), tp + fn
    both_classes = 0 < n_pos < n

    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    # a class absent from truth and prediction has no F1 to average
    present = [f for f, seen in ((f1_pos, tp + fp + fn), (f1_neg, tn + fp + fn)) if seen]
    recalls = [r for r, seen in ((_ratio(tp, n_pos), n_pos), (_ratio(tn, n - n_pos), n - n_pos)) if seen]

    if both_classes:
        den = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / den if den else 0.0
        auroc = float(roc_auc_score(truth, y_score))
        auprc = float(average_precision_score(truth, y_score))
    else:
        mcc = auroc = auprc = float("nan")

    return {
        "f1": f1_pos,
        "macro_f1": float(np.mean(present)),
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": float(np.mean(recalls)),
        "mcc": float(mcc),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_pos),
        "n": n,
        "n_pos": n_pos,
    }


def summarise(scores) -> dict:
    """Mean and (population) std of each numeric metric over splits, ignoring NaN.

    ``scores`` is a list of metric dicts as returned by :func:`score`; ``None``
    entries (skipped splits) are ignored. Returns ``{metric: {"mean", "std", "n"}}``
    where ``n`` counts the non-NaN values; a metric with none has NaN mean and std.
    """
    scores = [s for s in scores if s is not None]
    keys: list[str] = []
    for s in scores:
        for k, v in s.items():
            if k not in keys and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                keys.append(k)
    out = {}
    for k in keys:
        values = np.array([float(s[k]) for s in scores if k in s], dtype=float)
        values = values[~np.isnan(values)]
        if len(values):
            out[k] = {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}
        else:
            out[k] = {"mean": float("nan"), "std": float("nan"), "n": 0}
    return out
