"""Heads: registry, learning, chance on noise, class balance, determinism."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from scdrugmap.errors import UserError
from scdrugmap.probe.heads import HEADS, BalancedMLPClassifier, head_names, make_head
from scdrugmap.probe.metrics import score

ALL_HEADS = ["lgbm", "lr", "mlp"]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # as evaluate() does: multi-threaded BLAS crawls when the CPU is shared
    with threadpool_limits(limits=1):
        yield


def _data(n, d=10, seed=0, separable=True, pos_frac=0.5):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    if separable:
        # positive class shifted along two informative axes: a clear margin
        y = (rng.random(n) < pos_frac).astype(int)
        X[:, 0] += np.where(y == 1, 2.5, -2.5)
        X[:, 1] += np.where(y == 1, 1.5, -1.5)
    else:
        y = (rng.random(n) < pos_frac).astype(int)  # labels independent of X
    return X, y


def test_registry_lists_heads():
    assert head_names() == ALL_HEADS
    assert set(HEADS) == set(ALL_HEADS)
    assert all(callable(f) for f in HEADS.values())


def test_unknown_head_lists_known_heads():
    with pytest.raises(UserError) as err:
        make_head("svm", 0)
    msg = str(err.value)
    assert "svm" in msg and all(name in msg for name in ALL_HEADS)
    assert "\n" not in msg


@pytest.mark.parametrize("head", ALL_HEADS)
def test_unknown_parameter_is_user_error(head):
    with pytest.raises(UserError, match="not_a_param"):
        make_head(head, 0, not_a_param=3)


def test_lgbm_threads_default_to_one():
    assert make_head("lgbm", 0).get_params()["n_jobs"] == 1
    assert make_head("lgbm", 0, n_threads=2).get_params()["n_jobs"] == 2
    assert make_head("lgbm", 0, n_threads=2, n_jobs=3).get_params()["n_jobs"] == 3


def test_params_override_defaults():
    assert make_head("lr", 0, C=0.1)[-1].C == 0.1
    assert make_head("lgbm", 0, n_estimators=7, max_bin=15).get_params()["max_bin"] == 15
    mlp = make_head("mlp", 3, hidden_layer_sizes=(8,))[-1]
    assert mlp.hidden_layer_sizes == (8,) and mlp.random_state == 3
    # the default MLP is the paper's 3-layer head: two hidden layers + output
    assert len(make_head("mlp", 0)[-1].hidden_layer_sizes) == 2


@pytest.mark.parametrize("head", ALL_HEADS)
def test_head_learns_separable_problem(head):
    X, y = _data(1200, seed=1)
    est = make_head(head, 0).fit(X[:800], y[:800])
    proba = est.predict_proba(X[800:])[:, list(est.classes_).index(1)]
    assert score(y[800:], proba)["f1"] > 0.9


@pytest.mark.parametrize("head", ALL_HEADS)
def test_head_is_near_chance_on_noise(head):
    X, y = _data(2000, seed=2, separable=False)
    est = make_head(head, 0).fit(X[:1000], y[:1000])
    proba = est.predict_proba(X[1000:])[:, list(est.classes_).index(1)]
    m = score(y[1000:], proba)
    assert abs(m["auroc"] - 0.5) < 0.08
    assert abs(m["balanced_accuracy"] - 0.5) < 0.08


@pytest.mark.parametrize("head", ALL_HEADS)
def test_head_balances_rare_positive_class(head):
    # 8% resistant, class means +-1 on one axis (unit variance). The accuracy-
    # optimal threshold sits at x = ln(.92/.08)/2 = 1.22 -> recall ~0.41; with
    # balanced class weights it moves to x = 0 -> recall ~0.84
    # (measured: lr 0.87, lgbm 0.68, mlp 0.91; without weighting all ~0.45-0.47).
    rng = np.random.default_rng(3)
    y = (rng.random(6000) < 0.08).astype(int)
    X = rng.standard_normal((6000, 4)).astype(np.float32)
    X[:, 0] += np.where(y == 1, 1.0, -1.0)
    est = make_head(head, 0).fit(X[:4000], y[:4000])
    proba = est.predict_proba(X[4000:])[:, list(est.classes_).index(1)]
    assert score(y[4000:], proba)["recall"] > 0.6  # unweighted heads: ~0.47


@pytest.mark.parametrize("head", ALL_HEADS)
def test_same_seed_same_predictions(head):
    X, y = _data(600, seed=4)
    X[:, 0] *= 0.3  # make the problem non-trivial so randomness could show
    first = make_head(head, 7).fit(X[:400], y[:400]).predict_proba(X[400:])
    second = make_head(head, 7).fit(X[:400], y[:400]).predict_proba(X[400:])
    assert first.dtype.kind == "f"
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("head", ["lgbm", "mlp"])
def test_seed_matters_for_stochastic_heads(head):
    X, y = _data(600, seed=4)
    X[:, 0] *= 0.3
    a = make_head(head, 1).fit(X[:400], y[:400]).predict_proba(X[400:])
    b = make_head(head, 2).fit(X[:400], y[:400]).predict_proba(X[400:])
    assert not np.array_equal(a, b)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_passes_balanced_sample_weight(monkeypatch):
    seen = {}
    original = BalancedMLPClassifier.__mro__[1].fit

    def spy(self, X, y, sample_weight=None):
        seen["w"] = sample_weight
        return original(self, X, y, sample_weight=sample_weight)

    monkeypatch.setattr(BalancedMLPClassifier.__mro__[1], "fit", spy)
    y = np.array([0] * 300 + [1] * 100)
    X = np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32)
    make_head("mlp", 0, max_iter=2).fit(X, y)
    w = seen["w"]
    # each class carries half of the total weight
    assert np.isclose(w[y == 0].sum(), w[y == 1].sum())


def test_mlp_small_training_set_skips_early_stopping():
    X, y = _data(40, seed=5)
    pipe = make_head("mlp", 0, max_iter=300)
    pipe.fit(X, y)
    clf = pipe[-1]
    assert clf.early_stopping is True  # parameter restored after the fit
    assert clf.validation_scores_ is None  # no validation split was used


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_rare_class_skips_early_stopping():
    # 3 resistant cells in 400: a stratified 10% validation split would fail
    rng = np.random.default_rng(6)
    X = rng.standard_normal((400, 4)).astype(np.float32)
    y = np.zeros(400, dtype=int)
    y[:3] = 1
    X[:3, 0] += 4
    clf = make_head("mlp", 0, max_iter=100).fit(X, y)[-1]
    assert clf.validation_scores_ is None and clf.early_stopping is True
