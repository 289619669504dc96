"""Train/test splits for pooled-data and cross-data evaluation.

Pooled evaluation is k-fold cross-validation over all cells. Cells of one sample
(or patient) share batch effects and response label, so a cell-level split lets a
head recognise the sample rather than the response; holding out whole groups
(:func:`pooled_splits` with ``groups``) measures generalisation to unseen samples.
The paper's pooled setting is the cell-level split (``group_by="none"``).

Cross-data evaluation (:func:`cross_splits`) holds out one whole dataset at a time.
All splits are deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from scdrugmap.errors import UserError

GROUP_BY_CHOICES = ("auto", "sample", "patient", "none")

LEAK_NOTE = (
    "cell-level split: cells of one sample can be in both train and test, "
    "so scores can reflect sample identity (the paper's pooled setting)"
)


@dataclass(frozen=True, eq=False)
class Split:
    """One train/test partition: positional indices into the evaluated cells."""

    name: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    note: str = ""


def _class_label(c) -> str:
    names = {0: "0 (sensitive)", 1: "1 (resistant)"}
    try:
        return names.get(int(c), str(c))
    except (TypeError, ValueError):
        return str(c)


def _check_two_classes(y: np.ndarray) -> np.ndarray:
    classes = np.unique(y)
    if len(classes) < 2:
        raise UserError(
            f"all {len(y)} cells have response {_class_label(classes[0]) if len(classes) else 'none'}; "
            "evaluation needs both sensitive and resistant cells - select more data"
        )
    return classes


def _check_n_splits(n_splits: int) -> None:
    if n_splits < 2:
        raise UserError(f"number of folds is {n_splits}; use at least 2")


def _groups_per_class(y: np.ndarray, groups: np.ndarray) -> dict:
    """Class -> number of distinct groups among its cells."""
    frame = pd.DataFrame({"y": y, "g": groups})
    return frame.groupby("y")["g"].nunique().to_dict()


def pooled_splits(y, groups=None, n_splits: int = 5, seed: int = 0) -> list[Split]:
    """Stratified k-fold splits, grouped when ``groups`` is given.

    With groups, every group lies entirely in train or in test
    (``StratifiedGroupKFold``). The number of folds is lowered to what the data
    allow -- the smallest number of groups (or cells) in one class -- so that every
    test fold can contain both classes; the reduction is recorded in ``Split.note``.

    ``StratifiedGroupKFold`` assigns groups greedily by class balance and uses
    ``seed`` only to order groups of equal balance (scikit-learn >= 1.8), so
    grouped folds change little, often not at all, between seeds.
    """
    y = np.asarray(y)
    _check_n_splits(n_splits)
    classes = _check_two_classes(y)
    dummy = np.zeros((len(y), 1))
    note = ""

    if groups is None:
        counts = {c: int((y == c).sum()) for c in classes}
        smallest = min(counts, key=counts.get)
        if counts[smallest] < 2:
            raise UserError(
                f"class {_class_label(smallest)} has only {counts[smallest]} cell; "
                "cross-validation needs at least 2 cells per class - select more data"
            )
        k = min(n_splits, counts[smallest])
        if k < n_splits:
            note = (
                f"{k} folds instead of {n_splits}: class {_class_label(smallest)} "
                f"has only {counts[smallest]} cells"
            )
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(dummy, y)
    else:
        groups = _check_grouping("group", y, groups)
        per_class = _groups_per_class(y, groups)
        smallest = min(per_class, key=per_class.get)
        k = min(n_splits, per_class[smallest])
        if k < n_splits:
            note = (
                f"{k} folds instead of {n_splits}: class {_class_label(smallest)} "
                f"has only {per_class[smallest]} groups"
            )
        folds, k_used = _grouped_folds(y, groups, k, seed, per_class)
        if k_used < k:
            note = (f"{k_used} folds instead of {n_splits}: with more, some fold's training or test part "
                    "would hold one class only")
        k = k_used

    splits = []
    for i, (train_idx, test_idx) in enumerate(folds, start=1):
        if len(test_idx) == 0:  # cannot happen with k <= groups per class; be safe
            continue
        splits.append(Split(f"fold{i}", train_idx, test_idx, note))
    return splits


def _both_classes(y: np.ndarray, folds) -> bool:
    return all(len(np.unique(y[train])) == 2 and len(np.unique(y[test])) == 2 for train, test in folds)


SEARCH_GROUPS = 16            # up to this many groups, every 2-fold partition is tried


def _two_folds_by_search(y, groups):
    """The most even 2-fold grouped partition whose four parts all hold both classes, found by
    trying every partition (few groups only); None if there is none. Used where
    StratifiedGroupKFold's greedy assignment missed one."""
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) > SEARCH_GROUPS:
        return None
    pos = np.bincount(inverse, weights=y == 1, minlength=len(names))
    neg = np.bincount(inverse, weights=y != 1, minlength=len(names))
    masks = np.arange(1, 2 ** (len(names) - 1))                       # group 0 always in the second fold
    member = ((masks[:, None] >> np.arange(len(names))[None, :]) & 1).astype(bool)
    t_pos, t_neg = member @ pos, member @ neg
    valid = (t_pos > 0) & (t_neg > 0) & (pos.sum() - t_pos > 0) & (neg.sum() - t_neg > 0)
    if not valid.any():
        return None
    size = t_pos + t_neg
    best = np.flatnonzero(valid)[np.argmin(np.abs(size[valid] - len(y) / 2))]
    test_first = member[best][inverse]
    idx = np.arange(len(y))
    return [(idx[~test_first], idx[test_first]), (idx[test_first], idx[~test_first])]


def _grouped_folds(y, groups, k: int, seed: int, per_class: dict):
    """Grouped folds whose every training and test part holds both classes: ``k`` folds if
    StratifiedGroupKFold's greedy assignment gives that, else the most folds below ``k`` that
    do; a one-line error (with the fix) when no number of folds can."""
    dummy = np.zeros((len(y), 1))
    for n in range(k, 1, -1):
        folds = list(StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed).split(dummy, y, groups))
        if _both_classes(y, folds):
            return folds, n
    folds = _two_folds_by_search(y, groups)
    if folds is not None:
        return folds, 2
    counts = ", ".join(f"{_class_label(c)}: {n}" for c, n in sorted(per_class.items()))
    raise UserError(
        f"holding out whole groups cannot give every fold both classes ({len(np.unique(groups))} groups; groups "
        f"per class {counts}), so the scores would mean nothing: use another --group-by (e.g. sample instead of "
        "patient), or a cohort with more groups of each class"
    )


def _known(values) -> bool:
    """True when every cell has a non-null value."""
    return values is not None and len(values) > 0 and not pd.isna(np.asarray(values)).any()


def _check_grouping(name: str, y: np.ndarray, values) -> np.ndarray:
    """Group ids (as strings) usable for grouped CV; UserError naming ``name`` if not."""
    if values is None:
        raise UserError(f"--group-by {name}: no {name} ids are stored; use --group-by auto or none")
    values = np.asarray(values)
    if len(values) != len(y):
        raise ValueError(f"{name} ids have {len(values)} entries for {len(y)} labels")
    missing = int(pd.isna(values).sum())
    if missing:
        raise UserError(
            f"{missing} of {len(y)} cells have no {name} id; fill in the ids, "
            "or use --group-by auto or --group-by none"
        )
    groups = values.astype(str)
    per_class = _groups_per_class(y, groups)
    smallest = min(per_class, key=per_class.get)
    if per_class[smallest] < 2:
        raise UserError(
            f"class {_class_label(smallest)} has only one {name}, so grouped cross-validation "
            "is impossible; use --group-by none (a cell-level split), --group-by auto, or add data"
        )
    return groups


def resolve_group_by(group_by: str, y, samples=None, patients=None):
    """Choose the grouping for pooled CV: ``(name or None, groups or None, note)``.

    ``auto`` prefers patient (the unit of drug response), then sample, provided
    every cell has an id and each class spans more than one group; otherwise it
    falls back to a cell-level split and says that this can leak sample identity.
    """
    if group_by not in GROUP_BY_CHOICES:
        raise UserError(f"unknown --group-by {group_by!r}; choose one of: {', '.join(GROUP_BY_CHOICES)}")
    y = np.asarray(y)
    _check_two_classes(y)

    if group_by == "none":
        return None, None, LEAK_NOTE
    if group_by in ("patient", "sample"):
        values = patients if group_by == "patient" else samples
        groups = _check_grouping(group_by, y, values)
        return group_by, groups, f"whole {group_by}s held out ({len(np.unique(groups))} {group_by}s)"

    reasons = []
    for name, values in (("patient", patients), ("sample", samples)):
        if not _known(values):
            reasons.append(f"{name} ids missing")
            continue
        groups = np.asarray(values).astype(str)
        per_class = _groups_per_class(y, groups)
        if min(per_class.values()) < 2:
            reasons.append(f"a class has only one {name}")
            continue
        return name, groups, f"auto: whole {name}s held out ({len(np.unique(groups))} {name}s)"
    return None, None, f"auto: {LEAK_NOTE} ({'; '.join(reasons)})"


def cross_splits(datasets) -> list[Split]:
    """Leave-one-dataset-out splits, named after the held-out dataset (sorted)."""
    datasets = np.asarray(datasets)
    if pd.isna(datasets).any():
        raise UserError(f"{int(pd.isna(datasets).sum())} cells have no dataset id; re-import the data")
    datasets = datasets.astype(str)
    names = np.unique(datasets)
    if len(names) < 2:
        found = names[0] if len(names) else "none"
        raise UserError(
            f"cross-data evaluation needs at least 2 datasets, found 1 ({found}); "
            "select more datasets or use pooled evaluation"
        )
    idx = np.arange(len(datasets))
    return [
        Split(str(name), idx[datasets != name], idx[datasets == name])
        for name in names
    ]


def _auto_fallback(y, samples, candidates, failed: str, n_splits: int, seed: int):
    for name in candidates:
        try:
            groups = _check_grouping(name, y, samples)
            splits = pooled_splits(y, groups, n_splits=n_splits, seed=seed)
        except UserError:
            continue
        return name, groups, (f"auto: whole {name}s held out ({len(np.unique(groups))} {name}s; whole {failed}s "
                              "cannot give every fold both classes)"), splits
    return None, None, f"auto: {LEAK_NOTE} (whole {failed}s cannot give every fold both classes)", \
        pooled_splits(y, None, n_splits=n_splits, seed=seed)


def labelled_cells(cells: pd.DataFrame, where: str | None) -> tuple[pd.DataFrame, str | None, list[str]]:
    """The labelled cells of a selection: cells ingested without a label (NULL) are never used to
    train or score. Returns the cells (store order), the condition that selects exactly them
    (to load their embeddings) and a note when some were left out; no labelled cell at all is
    an error."""
    unlabelled = cells["label"].isna().to_numpy()
    if not unlabelled.any():
        return cells, where, []
    if unlabelled.all():
        datasets = ", ".join(dict.fromkeys(cells["dataset"]))
        raise UserError(f"the selected cells ({datasets}) have no sensitive/resistant label, so there is nothing to "
                        "train or score: select labelled cells with --where, or re-ingest with --label-col")
    condition = "label IS NOT NULL" if where is None else f"({where}) AND label IS NOT NULL"
    note = (f"{int(unlabelled.sum()):,} unlabelled cells of the selection were left out "
            "(no sensitive/resistant label: never used to train or score)")
    return cells[~unlabelled].reset_index(drop=True), condition, [note]


@dataclass
class Cohort:
    """The labels and splits of a selected cohort (:func:`cohort_splits`)."""

    y: np.ndarray                  # 1 = the positive class
    splits: list
    group_by: str                  # what whole units the splits hold out: patient | sample | dataset | none
    groups: np.ndarray | None      # pooled: every cell's group id (None for a cell-level split, and cross)
    datasets: list
    notes: list


def _ids(series: pd.Series):
    return None if series.isna().all() else series.to_numpy()


def cohort_splits(cells: pd.DataFrame, protocol: str, group_by: str = "auto", seed: int = 0,
                  positive: str = "resistant", n_splits: int = 5) -> Cohort:
    """Labels, splits and notes for the cells of a cohort (the store's ``cells`` frame, in store
    order). Shared by ``scdrugmap probe`` and ``scdrugmap finetune``: the same cohort and seed
    give both the same folds."""
    y = (cells["label"].to_numpy() == positive).astype(np.int64)
    datasets = sorted(cells["dataset"].unique())
    classes = set(cells["label"])
    if len(classes) < 2:
        only = classes.pop()
        raise UserError(f"the selected cohort ({', '.join(datasets)}) has only {only!r} cells, so there is "
                        "nothing to classify: add datasets with both classes or widen --where")
    notes = []
    single = [d for d, g in cells.groupby("dataset")["label"] if g.nunique() < 2]
    if single:
        notes.append(f"dataset(s) {', '.join(single)} have one class only: "
                     + ("they are scored on the metrics that one class allows" if protocol == "cross"
                        else "they take part in training and testing but cannot be scored on their own"))
    groups = None
    if protocol == "pooled":
        samples, patients = _ids(cells["sample"]), _ids(cells["patient"])
        group_name, groups, note = resolve_group_by(group_by, y, samples, patients)
        try:
            splits = pooled_splits(y, groups, n_splits=n_splits, seed=seed)
        except UserError:
            if group_by != "auto" or group_name is None:
                raise
            # auto: patients cannot give every fold both classes; samples may, else a cell-level split
            fallback = ("sample",) if group_name == "patient" else ()
            group_name, groups, note, splits = _auto_fallback(y, samples, fallback, group_name, n_splits, seed)
        if note:
            notes.append(note)
        notes.extend(dict.fromkeys(s.note for s in splits if s.note))
        group_label = group_name or "none"
    else:
        splits = cross_splits(cells["dataset"].to_numpy())
        group_label = "dataset"
    return Cohort(y, splits, group_label, groups, datasets, notes)
