"""End to end through the CLI on the real datasets in ../shared: ingest both, extract the
baselines, probe pooled (grouped and cell-level) and cross, leaderboard, query."""

from __future__ import annotations

import json

import pytest

from conftest import snapshot
from scdrugmap.store.store import Store


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from conftest import Cli, ingest_pc9_and_gbm

    cli = Cli()
    st = ingest_pc9_and_gbm(cli, tmp_path_factory.mktemp("e2e") / "st", quiet=False,
                            pc9_extra=["--drug", "erlotinib", "--cancer-type", "Lung cancer", "--tissue", "Cell line"],
                            gbm_extra=["--sample-col", "sample_id", "--drug", "panobinostat",
                                       "--cancer-type", "Glioblastoma", "--tissue", "Tumor tissue"])
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--backbone", "pca", "--quiet")
    return st


def test_pooled_grouped_by_patient_on_gbm(cli, real_store):
    out = cli.ok("probe", "--store", real_store, "--backbone", "pca", "--head", "lr", "--head", "lgbm",
                 "--where", "dataset = 'gbm'", "--quiet")
    assert "patient" in out.output and "auto: whole patients held out (5 patients)" in out.stderr
    runs = Store.open(real_store).sql("SELECT * FROM probe_runs ORDER BY created_at")
    assert set(runs["head"]) == {"lr", "lgbm"} and set(runs["group_by"]) == {"patient"}
    assert all(list(d) == ["gbm"] for d in runs["datasets"])


def test_pc9_cannot_group_and_says_the_split_can_leak(cli, real_store):
    result = cli.ok("probe", "--store", real_store, "--backbone", "hvg", "--head", "lr", "--where",
                    "dataset = 'pc9'", "--quiet")
    assert "sample identity" in result.stderr          # one sample per class: cell-level split
    cli.fails("probe", "--store", real_store, "--backbone", "hvg", "--where", "dataset = 'pc9'",
              "--group-by", "sample", "--quiet", match="sample")
    # control and day-11 erlotinib cells differ: far better than chance (AUROC 0.5, MCC 0;
    # F1 alone is uninformative here: always answering 'resistant' scores 0.86)
    scores = Store.open(real_store).sql("""SELECT avg(auroc) auroc, avg(mcc) mcc FROM probe_results
                                           JOIN probe_runs USING (run_id)
                                           WHERE backbone = 'hvg' AND group_by = 'none'""").iloc[0]
    assert scores["auroc"] > 0.7 and scores["mcc"] > 0.2


def test_cross_dataset_and_leaderboard(cli, real_store):
    out = cli.ok("probe", "--store", real_store, "--backbone", "hvg", "--backbone", "pca", "--head", "lr",
                 "--protocol", "cross", "--quiet").output
    assert "cross" in out
    board = cli.ok("leaderboard", "--store", real_store, "--protocol", "cross").output
    assert "hvg" in board and "pca" in board and "dataset" in board
    res = Store.open(real_store).sql("""SELECT split, n_test FROM probe_results JOIN probe_runs USING (run_id)
                                        WHERE protocol = 'cross' AND backbone = 'hvg' ORDER BY split""")
    assert res.to_dict("list") == {"split": ["gbm", "pc9"], "n_test": [5000, 1505]}


def test_query_cohort_and_provenance(cli, real_store):
    out = cli.ok("query", "--store", real_store,
                 "SELECT cancer_type, label, count(*) AS n FROM cohort GROUP BY ALL ORDER BY ALL").output
    assert "Glioblastoma" in out and "2500" in out and "1126" in out
    prov = Store.open(real_store).provenance()
    assert set(prov["backbone"]) == {"hvg", "pca"} and len(prov) == 4
    assert json.loads(prov[prov.backbone == "pca"]["params"].iloc[0])["fitted_on"] == ["gbm", "pc9"]


@pytest.mark.parametrize("args, match", [
    (["--backbone", "nope"], "has no embeddings"),
    (["--backbone", "pca", "--where", "dataset = 'nope'"], "matches no cells"),
    (["--backbone", "pca", "--where", "no_column = 1"], "invalid --where"),
    (["--backbone", "pca", "--where", "label = 'sensitive'"], "only 'sensitive' cells"),
    (["--backbone", "pca", "--where", "dataset = 'pc9'", "--protocol", "cross"], "at least 2"),
])
def test_probe_bad_input(cli, real_store, args, match):
    before = snapshot(real_store)
    cli.fails("probe", "--store", real_store, *args, "--quiet", match=match)
    assert snapshot(real_store) == before


def test_leaderboard_bad_metric(cli, real_store):
    cli.fails("leaderboard", "--store", real_store, "--metric", "nope", match="unknown metric")


def test_demo_runs(cli, tmp_path):
    out = cli.ok("demo", "--out", tmp_path / "demo").output
    assert "Leaderboard by F1" in out and "5/5 leaderboard" in out
    # 2 backbones x 3 heads x 2 protocols, and one cell-level split for the report's leakage gap
    assert len(Store.open(tmp_path / "demo" / "store").sql("SELECT * FROM probe_runs")) == 13
    assert "report: " in out and (tmp_path / "demo" / "report.html").stat().st_size > 100_000


def test_simulate_command_writes_ingestable_files(cli, tmp_path):
    import pandas as pd

    out = cli.ok("simulate", tmp_path / "sim", "--datasets", "2", "--cells", "100", "--genes", "1000").output
    assert "wrote 2 datasets (200 cells)" in out
    catalog = pd.read_csv(tmp_path / "sim" / "catalog.csv")
    assert list(catalog["dataset"]) == ["SimData1", "SimData2"] and catalog["drug"].notna().all()
    cli.ok("ingest", tmp_path / "sim" / "SimData1.h5ad", "--store", tmp_path / "st", "--dataset", "SimData1",
           "--label-col", "response", "--sample-col", "sample_id")
    out = cli.ok("simulate", tmp_path / "paper", "--paper", "--scale", "0.002", "--genes", "1000").output
    assert "wrote 36 datasets" in out
