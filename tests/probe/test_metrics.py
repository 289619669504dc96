"""Metrics against hand-computed values, sklearn, and one-class edge cases."""

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from scdrugmap.probe.metrics import METRICS, score, summarise


def test_hand_computed_example():
    # truth   1    1    1    0    0    0
    # score  .9   .6   .2   .7   .1   .4   -> pred 1 1 0 1 0 0
    # TP=2 FN=1 FP=1 TN=3-1=2
    # precision = recall = 2/3, F1 = 2TP/(2TP+FP+FN) = 4/6 = 2/3
    # F1(neg) = 2TN/(2TN+FN+FP) = 4/6, macro F1 = 2/3
    # accuracy = 4/6, balanced accuracy = (2/3 + 2/3)/2 = 2/3
    # MCC = (TP*TN - FP*FN)/sqrt(3*3*3*3) = (4-1)/9 = 1/3
    # AUROC: pairs pos>neg: .9 beats 3, .6 beats 2, .2 beats 1 -> 6/9 = 2/3
    # AUPRC (average precision): ranks P N P N P N -> (1 + 2/3 + 3/5)/3 = 34/45
    y = [1, 1, 1, 0, 0, 0]
    s = [0.9, 0.6, 0.2, 0.7, 0.1, 0.4]
    m = score(y, s)
    assert set(METRICS) <= set(m)
    expected = dict(
        f1=2 / 3, macro_f1=2 / 3, precision=2 / 3, recall=2 / 3, accuracy=4 / 6,
        balanced_accuracy=2 / 3, mcc=1 / 3, auroc=2 / 3, auprc=34 / 45,
    )
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k
    assert m["n"] == 6 and m["n_pos"] == 3


def test_asymmetric_hand_example():
    # truth 1 1 0 0 0 0 0 0 ; pred 1 0 1 1 0 0 0 0  -> TP=1 FN=1 FP=2 TN=4
    # precision 1/3, recall 1/2, F1 = 2/(2+2+1) = 2/5
    # F1(neg) = 8/(8+1+2) = 8/11, macro = (2/5 + 8/11)/2 = 31/55
    # balanced acc = (1/2 + 4/6)/2 = 7/12 ; MCC = (4-2)/sqrt(3*2*6*5) = 2/sqrt(180)
    y = [1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.8, 0.3, 0.6, 0.5, 0.2, 0.1, 0.0, 0.4]
    m = score(y, s)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 5)
    assert m["macro_f1"] == pytest.approx(31 / 55)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(180))
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    m = score(y, s)
    p = (s >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(skm.f1_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, s))


def test_positive_label_and_threshold():
    y = np.array(["R", "R", "S", "S"])
    m = score(y, [0.9, 0.4, 0.3, 0.1], positive="R", threshold=0.35)
    assert m["f1"] == 1.0 and m["auroc"] == 1.0 and m["n_pos"] == 2


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_is_nan_without_warnings(label):
    y = [label] * 5
    s = [0.9, 0.2, 0.6, 0.1, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = score(y, s)
    for k in ("auroc", "auprc", "mcc"):
        assert math.isnan(m[k]), k
    assert m["accuracy"] == pytest.approx(2 / 5 if label == 1 else 3 / 5)
    assert m["balanced_accuracy"] == m["accuracy"]
    if label == 0:  # no true positives: F1/precision/recall of "resistant" are 0
        assert m["f1"] == m["precision"] == m["recall"] == 0.0
    else:
        assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3))


def test_constant_prediction_scores_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = score([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4])
    assert m["f1"] == m["precision"] == m["recall"] == m["mcc"] == 0.0
    assert m["balanced_accuracy"] == 0.5


def test_bad_inputs():
    with pytest.raises(ValueError):
        score([], [])
    with pytest.raises(ValueError):
        score([0, 1], [0.5])
    with pytest.raises(ValueError):
        score([0, 1], [0.5, float("nan")])


def test_summarise_ignores_nan_and_skipped():
    runs = [
        {"f1": 0.5, "auroc": float("nan"), "n": 10},
        {"f1": 0.7, "auroc": 0.8, "n": 20},
        None,
        {"f1": 0.9, "auroc": 0.6, "n": 30},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = summarise(runs)
    assert out["f1"]["mean"] == pytest.approx(0.7)
    assert out["f1"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))
    assert out["f1"]["n"] == 3
    assert out["auroc"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "n": 2}
    assert out["n"]["mean"] == 20


def test_summarise_all_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = summarise([{"mcc": float("nan")}, {"mcc": float("nan")}])
    assert math.isnan(out["mcc"]["mean"]) and out["mcc"]["n"] == 0
    assert summarise([]) == {}
