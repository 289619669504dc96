"""evaluate(): per-split records, degenerate splits, determinism, errors."""

import math

import numpy as np
import pytest

from scdrugmap.errors import UserError
from scdrugmap.probe.evaluate import evaluate
from scdrugmap.probe.splits import Split, pooled_splits


def _separable(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, 0] += np.where(y == 1, 3.0, -3.0)
    return X, y


def test_pooled_evaluation_records():
    X, y = _separable()
    seen = []
    records = evaluate(X, y, pooled_splits(y, seed=0), "lr", progress=seen.append)
    assert [r["split"] for r in records] == [f"fold{i}" for i in range(1, 6)]
    assert seen == records  # progress called once per split, with its record
    for r in records:
        assert r["status"] == "ok" and r["reason"] == ""
        assert r["n_train"] + r["n_test"] == len(y)
        assert r["fit_seconds"] >= 0
        assert r["metrics"]["f1"] > 0.9
        assert r["metrics"]["n"] == r["n_test"]


def test_one_class_test_is_scored():
    X, y = _separable()
    neg = np.flatnonzero(y == 0)
    split = Split("neg-only", np.setdiff1d(np.arange(len(y)), neg[:20]), neg[:20], note="n")
    (r,) = evaluate(X, y, [split], "lr")
    assert r["status"] == "one-class-test" and "only class 0" in r["reason"]
    assert r["note"] == "n"
    assert math.isnan(r["metrics"]["auroc"]) and math.isnan(r["metrics"]["mcc"])
    assert r["metrics"]["accuracy"] > 0.9


def test_one_class_train_is_skipped():
    X, y = _separable()
    pos = np.flatnonzero(y == 1)
    split = Split("pos-train", pos, np.flatnonzero(y == 0))
    calls = []
    (r,) = evaluate(X, y, [split], "lgbm", progress=calls.append)
    assert r["status"] == "one-class-train" and "only class 1" in r["reason"]
    assert r["metrics"] is None and r["fit_seconds"] is None
    assert len(calls) == 1


@pytest.mark.parametrize("head", ["lgbm", "mlp"])
def test_evaluation_is_deterministic(head):
    X, y = _separable(300)
    X[:, 0] *= 0.2
    splits = pooled_splits(y, n_splits=3, seed=1)
    a = evaluate(X, y, splits, head, seed=4, head_params={"max_iter": 30} if head == "mlp" else None)
    b = evaluate(X, y, splits, head, seed=4, head_params={"max_iter": 30} if head == "mlp" else None)
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]


def test_head_params_are_used():
    X, y = _separable()
    records = evaluate(X, y, pooled_splits(y, n_splits=2), "lgbm", head_params={"n_estimators": 5})
    assert all(r["status"] == "ok" for r in records)


def test_errors_before_fitting():
    X, y = _separable()
    calls = []
    with pytest.raises(UserError, match="unknown head"):
        evaluate(X, y, pooled_splits(y), "svm", progress=calls.append)
    with pytest.raises(UserError, match="unknown parameter"):
        evaluate(X, y, pooled_splits(y), "lr", head_params={"bogus": 1})
    assert calls == []
    X_nan = X.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(UserError, match="1 cell embeddings contain NaN"):
        evaluate(X_nan, y, pooled_splits(y), "lr")
    with pytest.raises(UserError, match="threads"):
        evaluate(X, y, pooled_splits(y), "lr", n_threads=0)
    with pytest.raises(ValueError, match="0/1"):
        evaluate(X, y + 1, pooled_splits(y), "lr")
    with pytest.raises(ValueError, match="shape"):
        evaluate(X, y[:-1], pooled_splits(y), "lr")


def test_float64_input_accepted():
    X, y = _separable()
    records = evaluate(X.astype(np.float64), y, pooled_splits(y, n_splits=2), "lr")
    assert all(r["metrics"]["f1"] > 0.9 for r in records)


def test_thread_limit_applies_during_fit(monkeypatch):
    import scdrugmap.probe.evaluate as ev

    seen = []
    real = ev.threadpool_limits

    def spy(limits):
        seen.append(limits)
        return real(limits=limits)

    monkeypatch.setattr(ev, "threadpool_limits", spy)
    X, y = _separable()
    evaluate(X, y, pooled_splits(y, n_splits=2), "lr", n_threads=2)
    assert seen == [2, 2]


def test_fit_warnings_are_recorded_not_printed(recwarn):
    X, y = _separable()
    records = evaluate(X, y, pooled_splits(y, n_splits=2), "mlp", head_params={"max_iter": 1})
    assert all(any("Maximum iterations" in w for w in r["warnings"]) for r in records)
    assert all(len(r["warnings"]) == len(set(r["warnings"])) for r in records)
    assert not [w for w in recwarn if "Maximum iterations" in str(w.message)]
