"""Fitted heads as data, and back, without pickle.

A store travels between labs, and loading a pickle can run code, so a fitted head is written
as what it is made of:

* ``lr`` and ``mlp`` (``Pipeline([StandardScaler(), classifier])``): the fitted arrays of each
  step (the scaler's mean and scale; the logistic regression's coefficients and intercept; the
  MLP's weight matrices and biases) in ``head.npz``, their parameters and fitted scalars in the
  manifest (JSON). Loading builds fresh estimators of a fixed allow-list of classes and sets
  those attributes, so predictions are bit for bit the in-memory head's.
* ``lgbm``: LightGBM's own text model (``head.txt``), loaded by ``lightgbm.Booster(model_str=)``.

``np.load(..., allow_pickle=False)`` refuses any object array, so a crafted ``.npz`` cannot
run code either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError

# fitted attributes saved per estimator class: arrays, lists of arrays, and JSON scalars
_ATTRS = {
    "StandardScaler": {"arrays": ("mean_", "scale_", "var_", "n_samples_seen_"), "lists": (),
                       "scalars": ("n_features_in_",)},
    "LogisticRegression": {"arrays": ("coef_", "intercept_", "classes_", "n_iter_"), "lists": (),
                           "scalars": ("n_features_in_",)},
    "BalancedMLPClassifier": {"arrays": ("classes_",), "lists": ("coefs_", "intercepts_"),
                              "scalars": ("n_features_in_", "n_layers_", "n_outputs_", "out_activation_",
                                          "n_iter_")},
}
NPZ = "head.npz"
LGBM_TEXT = "head.txt"
SAVABLE_HEADS = ("lr", "lgbm", "mlp")


def _classes():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..probe.heads import BalancedMLPClassifier

    return {"StandardScaler": StandardScaler, "LogisticRegression": LogisticRegression,
            "BalancedMLPClassifier": BalancedMLPClassifier}


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def save_estimator(estimator, head: str, folder: Path) -> dict:
    """Write the fitted ``estimator`` of head ``head`` into ``folder``; returns the manifest's
    ``estimator`` entry (what :func:`load_estimator` needs besides the files)."""
    from sklearn.pipeline import Pipeline

    if head == "lgbm":
        (folder / LGBM_TEXT).write_text(estimator.booster_.model_to_string())
        return {"kind": "lightgbm", "file": LGBM_TEXT, "classes": [int(c) for c in estimator.classes_],
                "n_features": int(estimator.n_features_in_)}
    steps = estimator.steps if isinstance(estimator, Pipeline) else [("clf", estimator)]
    arrays, described = {}, []
    for name, step in steps:
        cls = type(step).__name__
        if cls not in _ATTRS:
            raise UserError(f"head {head!r} ({cls}) cannot be saved as data: 'scdrugmap fit' supports "
                            f"{', '.join(SAVABLE_HEADS)}")
        spec = _ATTRS[cls]
        entry = {"name": name, "class": cls, "params": _jsonable(step.get_params(deep=False)), "scalars": {},
                 "arrays": [], "lists": {}}
        for attr in spec["arrays"]:
            arrays[f"{name}.{attr}"] = np.asarray(getattr(step, attr))
            entry["arrays"].append(attr)
        for attr in spec["lists"]:
            values = getattr(step, attr)
            for i, v in enumerate(values):
                arrays[f"{name}.{attr}.{i}"] = np.asarray(v)
            entry["lists"][attr] = len(values)
        for attr in spec["scalars"]:
            entry["scalars"][attr] = _jsonable(getattr(step, attr))
        described.append(entry)
    np.savez(folder / NPZ, **arrays)
    return {"kind": "sklearn", "file": NPZ, "steps": described}


def load_estimator(folder: Path, entry: dict):
    """The head described by a manifest's ``estimator`` entry, built from the files in ``folder``
    (already checked against their sha256 by the caller); an object with ``predict_proba``."""
    kind = entry.get("kind")
    if kind == "lightgbm":
        import lightgbm

        booster = lightgbm.Booster(model_str=(folder / entry["file"]).read_text())
        return _Booster(booster, entry["classes"])
    if kind != "sklearn":
        raise UserError(f"{folder}: unknown head kind {kind!r}: the model was saved by a newer scdrugmap; upgrade it")
    try:
        return _load_sklearn(folder, entry)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{folder / entry['file']} holds object arrays, which are never unpickled: "
                            "the head was not written by scdrugmap; fit it again") from None
        raise


def _load_sklearn(folder: Path, entry: dict):
    from sklearn.pipeline import Pipeline

    allowed = _classes()
    steps = []
    with np.load(folder / entry["file"], allow_pickle=False) as data:
        for step in entry["steps"]:
            cls = allowed.get(step["class"])
            if cls is None:
                raise UserError(f"{folder}: unknown estimator class {step['class']!r} in its manifest")
            est = cls()
            params = dict(step["params"])
            if "hidden_layer_sizes" in params:
                params["hidden_layer_sizes"] = tuple(params["hidden_layer_sizes"])
            est.set_params(**params)
            name = step["name"]
            for attr in step["arrays"]:
                setattr(est, attr, data[f"{name}.{attr}"])
            for attr, n in step["lists"].items():
                setattr(est, attr, [data[f"{name}.{attr}.{i}"] for i in range(n)])
            for attr, value in step["scalars"].items():
                setattr(est, attr, value)
            if "n_samples_seen_" in step["arrays"] and est.n_samples_seen_.ndim == 0:
                est.n_samples_seen_ = est.n_samples_seen_.item()
            steps.append((name, est))
    return steps[0][1] if len(steps) == 1 else Pipeline(steps)


class _Booster:
    """A LightGBM booster with the sklearn wrapper's ``predict_proba`` and ``classes_``."""

    def __init__(self, booster, classes):
        self.booster, self.classes_ = booster, np.asarray(classes)

    def predict_proba(self, X):
        p = self.booster.predict(X)
        return np.vstack([1.0 - p, p]).T


def positive_proba(estimator, X: np.ndarray, positive: int = 1) -> np.ndarray:
    """The probability of class ``positive`` for each row of ``X``."""
    return estimator.predict_proba(X)[:, list(estimator.classes_).index(positive)]
