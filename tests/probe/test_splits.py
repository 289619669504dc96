"""Splits: grouping, stratification, determinism, group resolution, LODO."""

import numpy as np
import pytest

from scdrugmap.errors import UserError
from scdrugmap.probe.splits import Split, cross_splits, pooled_splits, resolve_group_by


def _grouped(n_groups_per_class=6, cells=(20, 60), seed=0):
    """Cells from groups with per-group labels (as in per-sample response)."""
    rng = np.random.default_rng(seed)
    y, groups = [], []
    for label in (0, 1):
        for g in range(n_groups_per_class):
            size = int(rng.integers(*cells))
            y += [label] * size
            groups += [f"s{label}_{g}"] * size
    return np.array(y), np.array(groups)


def _assert_partition(splits, n):
    tests = np.concatenate([s.test_idx for s in splits])
    assert np.array_equal(np.sort(tests), np.arange(n))  # each cell tested once
    for s in splits:
        assert len(np.intersect1d(s.train_idx, s.test_idx)) == 0
        assert len(s.train_idx) + len(s.test_idx) == n


def test_cell_level_stratified_folds():
    y = np.array([1] * 30 + [0] * 70)
    splits = pooled_splits(y, n_splits=5, seed=0)
    assert [s.name for s in splits] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    assert all(isinstance(s, Split) and s.note == "" for s in splits)
    _assert_partition(splits, len(y))
    for s in splits:
        assert y[s.test_idx].sum() == 6  # 30 positives spread evenly over 5 folds
        assert len(s.test_idx) == 20


def test_cell_level_folds_are_shuffled_and_deterministic():
    y = np.array([0, 1] * 50)
    a = pooled_splits(y, seed=3)
    b = pooled_splits(y, seed=3)
    c = pooled_splits(y, seed=4)
    for sa, sb in zip(a, b):
        assert np.array_equal(sa.test_idx, sb.test_idx)
        assert np.array_equal(sa.train_idx, sb.train_idx)
    assert any(not np.array_equal(sa.test_idx, sc.test_idx) for sa, sc in zip(a, c))
    assert not np.array_equal(a[0].test_idx, np.arange(20))  # not contiguous blocks


def test_grouped_folds_never_share_a_group():
    y, groups = _grouped()
    splits = pooled_splits(y, groups, n_splits=5, seed=1)
    assert len(splits) == 5
    _assert_partition(splits, len(y))
    for s in splits:
        assert not set(groups[s.train_idx]) & set(groups[s.test_idx])
        assert set(y[s.test_idx]) == {0, 1}  # stratified: both classes tested


def test_grouped_folds_deterministic():
    y, groups = _grouped()
    a = pooled_splits(y, groups, seed=5)
    b = pooled_splits(y, groups, seed=5)
    assert all(np.array_equal(x.test_idx, z.test_idx) for x, z in zip(a, b))


def test_grouped_seed_breaks_ties_between_equal_groups():
    # StratifiedGroupKFold (sklearn >= 1.8) shuffles only among groups with the
    # same class balance; equal-sized single-label groups are such ties.
    y, groups = _grouped(cells=(30, 31))
    a = pooled_splits(y, groups, seed=5)
    c = pooled_splits(y, groups, seed=6)
    assert any(not np.array_equal(x.test_idx, z.test_idx) for x, z in zip(a, c))


def test_too_few_groups_reduces_folds_with_note():
    y, groups = _grouped(n_groups_per_class=3)
    splits = pooled_splits(y, groups, n_splits=5)
    assert len(splits) == 3
    assert "3 folds instead of 5" in splits[0].note
    for s in splits:
        assert not set(groups[s.train_idx]) & set(groups[s.test_idx])
        assert set(y[s.test_idx]) == {0, 1}


def test_too_few_cells_reduces_folds_with_note():
    y = np.array([1] * 3 + [0] * 20)
    splits = pooled_splits(y, n_splits=5)
    assert len(splits) == 3 and "only 3 cells" in splits[0].note


def test_class_with_one_group_is_user_error():
    y = np.array([0] * 10 + [1] * 10)
    groups = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 10)
    with pytest.raises(UserError, match="--group-by none"):
        pooled_splits(y, groups)


def test_pooled_errors():
    with pytest.raises(UserError, match="both"):
        pooled_splits(np.zeros(10, dtype=int))
    with pytest.raises(UserError, match="at least 2"):
        pooled_splits(np.array([0, 1] * 5), n_splits=1)
    with pytest.raises(UserError, match="only 1 cell"):
        pooled_splits(np.array([1] + [0] * 9))
    with pytest.raises(UserError, match="no group id"):
        pooled_splits(np.array([0, 1] * 5), np.array(["a", None] * 5, dtype=object))


# --- resolve_group_by -------------------------------------------------------

Y = np.array([0] * 6 + [1] * 6)
SAMPLES = np.array(["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4", "s5", "s5", "s6", "s6"])
PATIENTS = np.array(["p1"] * 4 + ["p2"] * 2 + ["p3"] * 3 + ["p4"] * 3, dtype=object)


def test_auto_prefers_patient():
    name, groups, note = resolve_group_by("auto", Y, SAMPLES, PATIENTS)
    assert name == "patient" and list(groups) == list(PATIENTS)
    assert "patient" in note


def test_auto_falls_back_to_sample_when_patients_unknown_or_too_few():
    missing = PATIENTS.copy()
    missing[0] = None
    one_per_class = np.array(["p1"] * 6 + ["p2"] * 6, dtype=object)
    for patients in (None, missing, one_per_class):
        name, groups, _ = resolve_group_by("auto", Y, SAMPLES, patients)
        assert name == "sample" and list(groups) == list(SAMPLES)


def test_auto_falls_back_to_cells_with_leak_note():
    samples = np.array(["a"] * 6 + ["b"] * 6)
    name, groups, note = resolve_group_by("auto", Y, samples, None)
    assert name is None and groups is None
    assert "sample identity" in note and "cell-level" in note


def test_none_is_cell_level():
    name, groups, note = resolve_group_by("none", Y, SAMPLES, PATIENTS)
    assert name is None and groups is None and "sample identity" in note


def test_explicit_grouping():
    name, groups, _ = resolve_group_by("sample", Y, SAMPLES, PATIENTS)
    assert name == "sample" and list(groups) == list(SAMPLES)
    missing = PATIENTS.copy()
    missing[3] = np.nan
    with pytest.raises(UserError, match="1 of 12 cells have no patient id"):
        resolve_group_by("patient", Y, SAMPLES, missing)
    with pytest.raises(UserError, match="no patient ids"):
        resolve_group_by("patient", Y, SAMPLES, None)
    with pytest.raises(UserError, match="only one sample"):
        resolve_group_by("sample", Y, np.array(["a"] * 6 + ["b"] * 6), None)
    with pytest.raises(UserError, match="auto, sample, patient, none"):
        resolve_group_by("donor", Y, SAMPLES, PATIENTS)


# --- cross-data -------------------------------------------------------------


def test_leave_one_dataset_out():
    datasets = np.array(["GSE2", "GSE1", "GSE3", "GSE1", "GSE2", "GSE3", "GSE3"])
    splits = cross_splits(datasets)
    assert [s.name for s in splits] == ["GSE1", "GSE2", "GSE3"]
    _assert_partition(splits, len(datasets))
    for s in splits:
        assert set(datasets[s.test_idx]) == {s.name}
        assert s.name not in set(datasets[s.train_idx])


def test_cross_needs_two_datasets():
    with pytest.raises(UserError, match="at least 2 datasets"):
        cross_splits(np.array(["GSE1"] * 5))
    with pytest.raises(UserError, match="no dataset id"):
        cross_splits(np.array(["GSE1", None], dtype=object))
