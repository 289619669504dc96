"""Probe runs against a store: protocols, grouping, storage, determinism, leaderboard."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.probe.leaderboard import leaderboard
from scdrugmap.probe.run import run_probe
from scdrugmap.simulate import simulate_cohort, write_cohort
from scdrugmap.store.ingest import IngestRequest, ingest
from scdrugmap.extract.runner import extract
from scdrugmap.store.store import Store


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory):
    from scdrugmap.demo import demo_genes

    root = tmp_path_factory.mktemp("sim")
    cohort = simulate_cohort(n_datasets=3, cells_per_dataset=300, samples_per_dataset=6, genes=demo_genes(1200),
                             seed=1)
    for (name, _, meta), path in zip(cohort, write_cohort(cohort, root / "data")):
        ingest(root / "st", IngestRequest(file=path, dataset=name, label_col="response", sample_col="sample_id",
                                          patient_col="patient_id", context={"drug": meta["drug"]}))
    store = Store.open(root / "st")
    extract(store, "pca", show_progress=False)
    return root / "st"


def test_pooled_grouped_run_is_stored(sim_store):
    store = Store.open(sim_store)
    run = run_probe(store, "pca", head="lr", protocol="pooled", group_by="sample", seed=3, show_progress=False)
    assert run.group_by == "sample" and len(run.results) >= 2
    stored = store.sql(f"SELECT * FROM probe_runs WHERE run_id = '{run.run_id}'").iloc[0]
    assert stored["seed"] == 3 and stored["protocol"] == "pooled" and stored["method"] == "frozen"
    head = json.loads(stored["params"])["head"]
    assert head["estimator"] == "LogisticRegression" and head["class_weight"] == "balanced"
    assert head["random_state"] == 3 and head["preprocessing"] == ["scale"]
    assert sorted(stored["datasets"]) == ["SimData1", "SimData2", "SimData3"]
    results = store.sql(f"SELECT * FROM probe_results WHERE run_id = '{run.run_id}' ORDER BY split")
    assert len(results) == len(run.results) and results["f1"].between(0, 1).all()
    assert (results["n_train"] + results["n_test"] == 900).all()


def test_same_seed_same_results(sim_store):
    store = Store.open(sim_store)
    a = run_probe(store, "pca", head="lgbm", protocol="pooled", seed=7, show_progress=False).results
    b = run_probe(store, "pca", head="lgbm", protocol="pooled", seed=7, show_progress=False).results
    cols = ["split", "n_test", "f1", "auroc", "mcc"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_parallel_splits_give_identical_results(sim_store):
    store = Store.open(sim_store)
    a = run_probe(store, "pca", head="lgbm", protocol="cross", seed=2, show_progress=False).results
    b = run_probe(store, "pca", head="lgbm", protocol="cross", seed=2, n_jobs=2, show_progress=False).results
    cols = ["split", "n_test", "f1", "auroc", "mcc"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_cross_protocol_holds_out_each_dataset(sim_store):
    store = Store.open(sim_store)
    run = run_probe(store, "pca", head="lr", protocol="cross", show_progress=False)
    assert list(run.results["split"]) == ["SimData1", "SimData2", "SimData3"]
    assert list(run.results["n_test"]) == [300, 300, 300]
    assert run.group_by == "dataset"


def test_cell_level_split_says_it_can_leak(sim_store):
    run = run_probe(Store.open(sim_store), "pca", head="lr", group_by="none", show_progress=False)
    assert any("sample identity" in n for n in run.notes)


def test_one_class_cohort_is_explained(sim_store):
    before = snapshot(sim_store)
    with pytest.raises(UserError, match="has only 'resistant' cells"):
        run_probe(Store.open(sim_store), "pca", where="label = 'resistant'", show_progress=False)
    assert snapshot(sim_store) == before


def test_leaderboard_ranks_latest_runs(sim_store):
    store = Store.open(sim_store)
    run_probe(store, "pca", head="lr", protocol="cross", show_progress=False)
    board = leaderboard(store, metric="f1", protocol="cross")
    assert list(board["rank"]) == list(range(1, len(board) + 1))
    assert (board["f1"].diff().dropna() <= 0).all()
    assert set(board["protocol"]) == {"cross"}
    with pytest.raises(UserError, match="unknown metric"):
        leaderboard(store, metric="f1; DROP TABLE cells")


def test_one_class_held_out_dataset_is_reported_not_crashed(sim_store):
    where = "NOT (dataset = 'SimData1' AND label = 'sensitive')"
    run = run_probe(Store.open(sim_store), "pca", head="lr", protocol="cross", where=where, show_progress=False)
    held = run.results.set_index("split").loc["SimData1"]
    assert held["status"] == "one-class-test" and np.isnan(held["auroc"]) and held["n_test_positive"] == held["n_test"]
    assert any("SimData1" in n and "one class" in n for n in run.notes)
    assert (run.results.set_index("split").drop("SimData1")["status"] == "ok").all()


def test_probe_needs_neither_torch_nor_source_files(tmp_path):
    """A store whose .h5ad files are gone, probed in a process where torch cannot be imported."""
    import subprocess
    import sys

    cohort = simulate_cohort(n_datasets=2, cells_per_dataset=200, n_genes=300, seed=4)
    files = write_cohort(cohort, tmp_path / "data")
    for (name, _, _), path in zip(cohort, files):
        ingest(tmp_path / "st", IngestRequest(file=path, dataset=name, label_col="response"))
    (tmp_path / "panel.txt").write_text("\n".join(cohort[0][1].var_names[:100]))
    extract(Store.open(tmp_path / "st"), "hvg", options={"panel": str(tmp_path / "panel.txt")},
            show_progress=False)
    for path in files:
        path.unlink()
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'peft'):\n"
            "            raise ImportError(f'{name} is not installed here')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from scdrugmap.cli import main\n"
            "main(['probe', '--store', sys.argv[1], '--backbone', 'hvg', '--head', 'lr', '--protocol', 'cross',"
            " '--quiet'], standalone_mode=False)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "st")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cross" in result.stdout
    runs = Store.open(tmp_path / "st").sql("SELECT count(*) n FROM probe_results")
    assert runs["n"][0] == 2
