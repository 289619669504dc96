"""Classification heads for frozen cell embeddings.

A head is a factory ``(seed, n_threads, **params) -> sklearn estimator``
registered by name in :data:`HEADS`; adding a head is one decorated function, not
a new branch. Every head exposes ``fit(X, y)`` / ``predict_proba(X)``, accepts
float32 input and is deterministic for a given seed (and thread count: BLAS
results can differ in the last bits between thread counts).

Threads: heads are single-threaded by default. Under CPU contention (another
process busy on a 2-core machine) multi-threaded LightGBM and OpenBLAS spin on
barriers and ran 20-30x slower in our measurements (mlp 260k x 50: 118 s on 2
threads vs 10 s on 1; lgbm: 178 s vs 5 s); parallelise over splits or runs
instead. ``n_threads`` sets LightGBM's ``n_jobs``; BLAS threads of lr/mlp are
limited around the fit by :func:`scdrugmap.probe.evaluate.evaluate`.

Class imbalance (drug-response data are often dominated by one class):

* ``lr``   -- ``class_weight="balanced"`` in the logistic loss.
* ``lgbm`` -- ``class_weight="balanced"`` (per-sample weights in the gradients).
* ``mlp``  -- sklearn's MLP has no ``class_weight``; :class:`BalancedMLPClassifier`
  passes balanced ``sample_weight`` to ``fit`` (weighted loss, and the early-stopping
  validation score becomes balanced accuracy).

Defaults are chosen for a grid of ~41 fits on up to ~326k cells. Fit times
measured once, single-threaded, on 260k cells of float32 data (a non-linear
signal in 4 of the dims + noise):

=======  ===========  ============================================
head     260k x 50    260k x 512
=======  ===========  ============================================
lr       0.2 s        3.5 s
lgbm     5.2 s        53 s (2 threads, idle: ~30 s)
mlp      9.5 s        17 s
=======  ===========  ============================================

mlp stopped early after 8-11 epochs; its worst case is max_iter=50 epochs at
~0.9 s (50 dims) / ~2.2 s (512 dims) per epoch: under a minute at 260k x 50.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from scdrugmap.errors import UserError

HeadFactory = Callable[..., object]

#: name -> factory(seed, n_threads, **params) returning an unfitted sklearn estimator.
HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator adding a head factory to :data:`HEADS` under ``name``."""

    def decorator(factory: HeadFactory) -> HeadFactory:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = factory
        return factory

    return decorator


def head_names() -> list[str]:
    """Names of the registered heads, sorted."""
    return sorted(HEADS)


def make_head(name: str, seed: int = 0, n_threads: int = 1, **params):
    """Build an unfitted head; ``params`` override the head's defaults."""
    try:
        factory = HEADS[name]
    except KeyError:
        raise UserError(
            f"unknown head {name!r}; choose one of: {', '.join(head_names())}"
        ) from None
    return factory(seed, n_threads, **params)


def _build(cls, name: str, defaults: dict, params: dict):
    """Instantiate ``cls(**defaults | params)``; an unknown parameter is a UserError."""
    valid = cls().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)} for head {name!r}; "
            f"valid ones: {', '.join(sorted(valid))}"
        )
    estimator = cls(**{**defaults, **params})
    if params and hasattr(estimator, "_parameter_constraints"):    # scikit-learn's own value checks, now
        from sklearn.utils._param_validation import InvalidParameterError

        try:
            estimator._validate_params()
        except InvalidParameterError as e:
            raise UserError(f"invalid parameter for head {name!r}: {str(e).splitlines()[0]} "
                            "(give another value with --param NAME=VALUE)") from None
    return estimator


class BalancedMLPClassifier(MLPClassifier):
    """MLPClassifier whose ``fit`` weights samples inversely to class frequency.

    Early stopping needs a stratified validation split holding every class; when
    the training set has fewer than ``min_early_stopping_samples`` cells or a class
    has fewer than ``min_early_stopping_per_class``, it is switched off for that
    fit (small folds would otherwise crash in the split or stop on noise).
    """

    min_early_stopping_samples = 200
    min_early_stopping_per_class = 20

    def fit(self, X, y, sample_weight=None):
        y_arr = np.asarray(y)
        balanced = compute_sample_weight("balanced", y_arr)
        if sample_weight is not None:
            balanced = balanced * np.asarray(sample_weight, dtype=float)
        early = self.early_stopping
        _, counts = np.unique(y_arr, return_counts=True)
        if early and (
            len(y_arr) < self.min_early_stopping_samples
            or counts.min() < self.min_early_stopping_per_class
        ):
            self.early_stopping = False
        try:
            with warnings.catch_warnings():
                # small folds: sklearn clips batch_size to the fold size, as intended
                warnings.filterwarnings("ignore", message="Got `batch_size`", category=UserWarning)
                return super().fit(X, y_arr, sample_weight=balanced)
        finally:
            self.early_stopping = early


@register_head("lr")
def _lr(seed: int, n_threads: int = 1, **params):
    """Standardised logistic regression (lbfgs, L2, C=1, balanced classes)."""
    defaults = dict(
        C=1.0,
        solver="lbfgs",
        class_weight="balanced",
        max_iter=1000,
        tol=1e-4,
        random_state=seed,
    )
    clf = _build(LogisticRegression, "lr", defaults, params)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


@register_head("lgbm")
def _lgbm(seed: int, n_threads: int = 1, **params):
    """Gradient-boosted trees: 200 trees, lr 0.05, 31 leaves, balanced classes.

    63 histogram bins found on a 50k-row sample, 80% row bagging and 80% feature
    sampling: on 260k x 512 (2 threads, idle machine) 63 bins cut a fit from
    40-90 s to ~27-32 s. The accuracy effect of the coarser bins was not
    measured; pass ``max_bin=255`` to restore LightGBM's default.

    ``deterministic=True`` with row-wise histograms makes a fixed seed give
    identical predictions regardless of thread scheduling.
    """
    from lightgbm import LGBMClassifier  # imported lazily: only this head needs it

    defaults = dict(
        n_estimators=200,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=20,
        max_bin=63,
        subsample_for_bin=50_000,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        class_weight="balanced",
        random_state=seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=n_threads,
        verbose=-1,
    )
    # LGBMClassifier forwards unknown keywords to LightGBM, which ignores
    # misspelt ones silently at verbose=-1; check them against LightGBM's own list.
    known = set(LGBMClassifier().get_params(deep=False)) | set(defaults)
    native = _lightgbm_param_names()
    unknown = sorted(set(params) - known - native) if native else []
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)} for head 'lgbm'; "
            "see the LightGBM parameter docs for valid names"
        )
    return LGBMClassifier(**{**defaults, **params})


def _lightgbm_param_names() -> set[str]:
    """All LightGBM parameter names and aliases (empty set if unavailable)."""
    try:  # private helper of lightgbm; fall back to no check if it changes
        from lightgbm.basic import _ConfigAliases

        aliases = _ConfigAliases._get_all_param_aliases()
        return {name for names in aliases.values() for name in names}
    except Exception:
        return set()


@register_head("mlp")
def _mlp(seed: int, n_threads: int = 1, **params):
    """The paper's 3-layer MLP head: hidden (256, 64) ReLU + output layer.

    adam, L2 alpha 1e-4, batch 512, up to 50 epochs with early stopping on a
    10% stratified validation split (patience 5); balanced sample weights.
    """
    defaults = dict(
        hidden_layer_sizes=(256, 64),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=512,
        learning_rate_init=1e-3,
        max_iter=50,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=5,
        tol=1e-4,
        random_state=seed,
    )
    clf = _build(BalancedMLPClassifier, "mlp", defaults, params)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])
