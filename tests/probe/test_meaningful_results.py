"""Meaningless results must not look like results: grouped folds always hold both classes in
training and test parts (or the run is refused), and the leaderboard ranks like with like."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from scdrugmap.errors import UserError
from scdrugmap.probe.leaderboard import leaderboard
from scdrugmap.probe.run import run_probe
from scdrugmap.probe.splits import _both_classes, pooled_splits
from scdrugmap.store.store import Store


@pytest.fixture
def sim_store(store_copy):
    """The small simulated store (10 datasets, pca) with hvg too, and no probe runs."""
    from scdrugmap.extract.runner import extract

    st = store_copy()
    store = Store.open(st)
    with store.transaction() as con:
        con.execute("DELETE FROM probe_results")
        con.execute("DELETE FROM probe_runs")
    extract(store, "hvg", show_progress=False)
    return st


def _three_patients():
    """Patient P0 mixed, P1 all sensitive, P2 mostly sensitive: the greedy StratifiedGroupKFold puts
    P1 alone in a fold, whose test part has one class (the 'one-class-test' fold of the report)."""
    y = np.array([1] * 25 + [0] * 24 + [0] * 31 + [1] * 2 + [0] * 10)
    groups = np.array(["P0"] * 49 + ["P1"] * 31 + ["P2"] * 12)
    return y, groups


def test_greedy_folds_with_one_class_are_not_used():
    y, groups = _three_patients()
    greedy = list(StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=0).split(np.zeros((len(y), 1)), y,
                                                                                         groups))
    assert not _both_classes(y, greedy)                     # what scdrugmap used to score
    splits = pooled_splits(y, groups, seed=0)
    assert len(splits) == 2
    for s in splits:
        assert set(y[s.train_idx]) == {0, 1} and set(y[s.test_idx]) == {0, 1}
        assert not set(groups[s.train_idx]) & set(groups[s.test_idx])


@pytest.mark.parametrize("seed", range(40))
def test_grouped_folds_always_hold_both_classes(seed):
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(3, 9))
    sizes = rng.integers(3, 80, size=n_groups)
    fractions = rng.choice([0.0, 1.0, 0.1, 0.5, 0.9], size=n_groups)
    y = np.concatenate([(rng.random(n) < f).astype(int) for n, f in zip(sizes, fractions)])
    groups = np.repeat([f"G{i}" for i in range(n_groups)], sizes)
    try:
        splits = pooled_splits(y, groups, seed=seed)
    except UserError as e:                                   # impossible groupings are refused, with the fix
        assert "group" in str(e) and "--group-by" in str(e) or "only one" in str(e), e
        return
    for s in splits:
        assert set(y[s.train_idx]) == {0, 1} and set(y[s.test_idx]) == {0, 1}
        assert not set(groups[s.train_idx]) & set(groups[s.test_idx])
    assert sorted(np.concatenate([s.test_idx for s in splits]).tolist()) == list(range(len(y)))


def test_sample_grouping_of_pc9_is_refused_with_the_fix(cli, tmp_path, pc9):
    st = tmp_path / "st"
    cli.ok("ingest", pc9, "--store", st, "--dataset", "pc9", "--label-col", "response", "--sample-col", "sample_id")
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    err = cli.fails("probe", "--store", st, "--backbone", "hvg", "--group-by", "sample", "--quiet",
                    match="only one sample")
    assert "--group-by none" in err
    # auto says what it did instead: a cell-level split, marked as leaky
    cli.ok("probe", "--store", st, "--backbone", "hvg", "--quiet")
    board = leaderboard(Store.open(st))
    assert list(board["leaky"]) == ["yes"] and list(board["group_by"]) == ["none"]


def test_leaderboard_ranks_within_cohort_and_protocol(sim_store):
    store = Store.open(sim_store)
    subset = "\"row\" % 2 = 0 AND dataset IN ('SimData1', 'SimData2')"
    run_probe(store, "pca", head="lr", protocol="pooled", group_by="none", where=subset, show_progress=False)
    run_probe(store, "pca", head="lr", protocol="pooled", show_progress=False)
    run_probe(store, "hvg", head="lr", protocol="pooled", show_progress=False)
    run_probe(store, "pca", head="lr", protocol="pooled", group_by="none", show_progress=False)
    run_probe(store, "pca", head="lr", protocol="cross", show_progress=False)
    board = leaderboard(store, metric="f1")
    for (cohort, protocol), part in board.groupby(["cohort", "protocol"]):
        assert list(part["rank"]) == list(range(1, len(part) + 1)), (cohort, protocol)
        assert (part["f1"].diff().dropna() <= 0).all()
    sub = board[board["cohort"] == subset]
    assert list(sub["rank"]) == [1] and list(sub["leaky"]) == ["yes"]        # ranked alone, marked leaky
    whole = board[(board["cohort"] == "") & (board["protocol"] == "pooled")]
    assert set(whole["backbone"]) == {"hvg", "pca"} and len(whole) == 3
    assert whole.set_index(["backbone", "group_by"]).loc[("pca", "none"), "leaky"] == "yes"
    assert set(whole[whole["group_by"] != "none"]["leaky"]) == {""}


def test_leaderboard_cli_shows_each_cohort_in_full(cli, sim_store):
    subset = "dataset IN ('SimData1', 'SimData2') AND \"row\" % 2 = 0 AND label IN ('sensitive', 'resistant')"
    cli.ok("probe", "--store", sim_store, "--backbone", "pca", "--where", subset, "--group-by", "none", "--quiet")
    cli.ok("probe", "--store", sim_store, "--backbone", "pca", "--quiet")
    result = cli.ok("leaderboard", "--store", sim_store)
    out = " ".join(result.output.split())
    assert f"cohort: {subset}" in out and "cohort: all cells" in out
    assert "leaky = cell-level split" in result.stderr
    for metric in ("auroc", "f1", "mcc"):                      # one metric column, whatever the metric
        frame = leaderboard(Store.open(sim_store), metric=metric)
        assert list(frame.columns).count(metric) == 1
