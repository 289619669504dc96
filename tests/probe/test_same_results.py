"""The probe speed-ups change no answer: on the real PC9 and glioblastoma data every head, run
as one grid, gives the folds and, within 0.005, the F1 and AUROC of every split that the code
before them gave (``data/expected_real.json``, written by ``expected_real.py``); and a grid
gives the same results with one process or two."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import GBM, PC9, need_shared
from expected_real import COHORTS, EXPECTED, HEADS, build_store, cells_digest
from scdrugmap.probe.run import run_grid
from scdrugmap.probe.splits import cohort_splits
from scdrugmap.store.store import Store

TOLERANCE = 0.005


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("real") / "st", need_shared(PC9), need_shared(GBM))


def grid_results(store_dir, n_jobs=1) -> dict:
    store = Store.open(store_dir)
    got = {}
    for name, where, protocol, group_by in COHORTS:
        runs = run_grid(store, ["hvg", "pca"], HEADS, [protocol], group_by=group_by, where=where, seed=0,
                        n_jobs=n_jobs, show_progress=False)
        cells = store.cells(where)
        splits = cohort_splits(cells, protocol, group_by, 0).splits
        for run in runs:
            got[f"{run.backbone}/{name}/{protocol}/{run.head}"] = [
                {"split": r["split"], "status": r["status"], "test_cells": cells_digest(cells, s.test_idx),
                 "f1": r["f1"], "auroc": r["auroc"]} for (_, r), s in zip(run.results.iterrows(), splits)]
    return got


def test_same_folds_and_metrics_as_before(real_store):
    expected = json.loads(EXPECTED.read_text())
    got = grid_results(real_store)
    assert sorted(got) == sorted(expected)
    worst = 0.0
    for key, splits in expected.items():
        assert [s["split"] for s in got[key]] == [s["split"] for s in splits], key
        for old, new in zip(splits, got[key]):
            assert (new["status"], new["test_cells"]) == (old["status"], old["test_cells"]), (key, old["split"])
            for metric in ("f1", "auroc"):
                if old[metric] is None:
                    assert np.isnan(new[metric]), (key, old["split"], metric)
                    continue
                diff = abs(new[metric] - old[metric])
                worst = max(worst, diff)
                assert diff <= TOLERANCE, (key, old["split"], metric, old[metric], new[metric])
                if not key.endswith("/lgbm"):            # lr and mlp: the same arithmetic, bit for bit
                    assert diff < 1e-6, (key, old["split"], metric, old[metric], new[metric])
    print(f"largest difference: {worst:.6f}")


def test_two_processes_give_the_same_results(real_store):
    store = Store.open(real_store)
    a = run_grid(store, ["pca"], HEADS, ["pooled", "cross"], seed=3, show_progress=False)
    b = run_grid(store, ["pca"], HEADS, ["pooled", "cross"], seed=3, n_jobs=2, show_progress=False)
    for x, y in zip(a, b):
        assert (x.head, x.protocol) == (y.head, y.protocol)
        pd.testing.assert_frame_equal(x.results.drop(columns="fit_seconds"), y.results.drop(columns="fit_seconds"))
