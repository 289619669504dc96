"""Commands a new user runs on real data (PC9 + glioblastoma in ../shared): the leaderboard under
every metric, with seeds and --all-runs; probe on a backbone that covers only some datasets;
--csv/--json of probe, leaderboard and store info; notes once per command; tables off a terminal."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import Cli, copy_store, ingest_pc9_and_gbm, snapshot
from scdrugmap.store.schema import METRIC_COLUMNS
from scdrugmap.store.store import Store

NO_COLUMNS = {"COLUMNS": "40"}          # off a terminal COLUMNS does not narrow a table


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """pc9 and gbm ingested, pca extracted for both, one grouped pooled lr run (seed 0)."""
    cli = Cli()
    st = ingest_pc9_and_gbm(cli, tmp_path_factory.mktemp("cmds") / "st")
    cli.ok("extract", "--store", st, "--backbone", "pca", "--quiet")
    cli.ok("probe", "--store", st, "--backbone", "pca", "--head", "lr", "--quiet")
    return st


@pytest.fixture
def real_copy(real_store, tmp_path):
    return copy_store(real_store, tmp_path)


def _results(store, run_id) -> pd.DataFrame:
    return Store.open(store).sql("SELECT * FROM probe_results WHERE run_id = ? AND status <> 'one-class-train'",
                                 [run_id])


# ---- leaderboard ----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRIC_COLUMNS)
def test_leaderboard_every_metric(cli, real_store, metric):
    """Each metric the leaderboard accepts: a table with that metric once, values equal to the mean
    and sample std over the run's stored splits, ranked by it."""
    table = cli.ok("leaderboard", "--store", real_store, "--metric", metric, env=NO_COLUMNS).stdout
    header = next(line for line in table.splitlines() if "rank" in line and "backbone" in line)
    assert re.findall(rf"[┃|]\s*{metric}\s*[┃|]", header) and len(re.findall(rf"\b{metric}\b", header)) == 1, header
    rows = json.loads(cli.ok("leaderboard", "--store", real_store, "--metric", metric, "--json").stdout)
    assert rows and all(row["seed"] == 0 for row in rows)
    for row in rows:
        splits = _results(real_store, row["run_id"])[metric].dropna()
        assert row["splits"] == len(splits) == 5
        assert row[metric] == pytest.approx(splits.mean(), abs=1e-12)
        assert row[f"{metric}_std"] == pytest.approx(splits.std(ddof=1), abs=1e-12)
        if metric != "auroc":
            assert row["auroc"] == pytest.approx(_results(real_store, row["run_id"])["auroc"].mean(), abs=1e-12)
    values = [row[metric] for row in rows]
    assert values == sorted(values, reverse=True) and [row["rank"] for row in rows] == list(range(1, len(rows) + 1))


def test_leaderboard_unknown_metric_is_one_line(cli, real_store):
    before = snapshot(real_store)
    err = cli.fails("leaderboard", "--store", real_store, "--metric", "roc", match="unknown metric 'roc'")
    assert all(m in err for m in METRIC_COLUMNS)
    assert snapshot(real_store) == before


def test_leaderboard_shows_seeds_and_all_runs_lists_every_run(cli, real_copy):
    st = real_copy
    probe = ("probe", "--store", st, "--backbone", "pca", "--head", "lr", "--quiet")
    cli.ok(*probe, "--seed", "7")
    board = json.loads(cli.ok("leaderboard", "--store", st, "--json").stdout)
    assert sorted(row["seed"] for row in board) == [0, 7]       # another seed is another row, not a replacement
    runs = Store.open(st).sql("SELECT run_id, seed FROM probe_runs")
    assert {row["run_id"] for row in board} == set(runs["run_id"])
    cli.ok(*probe, "--seed", "7")                                 # the same configuration again: the latest is shown
    board = json.loads(cli.ok("leaderboard", "--store", st, "--json").stdout)
    latest = Store.open(st).sql("SELECT run_id FROM probe_runs WHERE seed = 7 ORDER BY created_at DESC LIMIT 1")
    assert sorted(row["seed"] for row in board) == [0, 7]
    assert latest["run_id"][0] in {row["run_id"] for row in board}
    every = json.loads(cli.ok("leaderboard", "--store", st, "--all-runs", "--json").stdout)
    assert len(every) == 3 and sorted(row["seed"] for row in every) == [0, 7, 7]
    assert all(row["created_at"] for row in every)
    table = cli.ok("leaderboard", "--store", st, "--all-runs", env=NO_COLUMNS).stdout
    header = next(line for line in table.splitlines() if "rank" in line)
    assert "seed" in header and "created_at" in header
    assert all(run_id in table for run_id in Store.open(st).sql("SELECT run_id FROM probe_runs")["run_id"])


def test_leaderboard_csv_equals_json(cli, real_copy, tmp_path):
    out = tmp_path / "board.csv"
    cli.ok("probe", "--store", real_copy, "--backbone", "pca", "--head", "lr", "--protocol", "cross", "--quiet")
    rows = json.loads(cli.ok("leaderboard", "--store", real_copy, "--metric", "mcc", "--json").stdout)
    printed = cli.ok("leaderboard", "--store", real_copy, "--metric", "mcc", "--csv", out).stdout
    frame = pd.read_csv(out, keep_default_na=False)
    assert "Leaderboard by mcc" in printed and len(frame) == len(rows) == 2
    assert list(frame["run_id"]) == [r["run_id"] for r in rows]
    assert np.allclose(frame["mcc"].astype(float), [r["mcc"] for r in rows], rtol=0, atol=1e-15)
    assert set(frame["protocol"]) == {"pooled", "cross"}


# ---- probe, store info: --csv / --json, tables ------------------------------------------------
def test_probe_csv_and_json_hold_the_stored_results(cli, real_copy, tmp_path):
    out = tmp_path / "probe.csv"
    result = cli.ok("probe", "--store", real_copy, "--backbone", "pca", "--head", "lr", "--protocol", "cross",
                    "--quiet", "--csv", out)
    frame = pd.read_csv(out)
    assert "Probe results" in result.stdout and len(frame) == 1
    row = frame.iloc[0]
    stored = _results(real_copy, row["run_id"])
    for metric in METRIC_COLUMNS:
        assert row[metric] == pytest.approx(stored[metric].mean(), abs=1e-12)
        assert row[f"{metric}_std"] == pytest.approx(stored[metric].std(ddof=1), abs=1e-12)
    assert row["splits"] == 2 and row["cells"] == 6505 and row["protocol"] == "cross"
    as_json = cli.ok("probe", "--store", real_copy, "--backbone", "pca", "--head", "lr", "--protocol", "cross",
                     "--quiet", "--json")
    [record] = json.loads(as_json.stdout)           # stdout is the JSON alone: notes and timings go to stderr
    assert record["f1"] == pytest.approx(row["f1"], abs=1e-12) and record["run_id"] != row["run_id"]
    assert "fits in" in as_json.stderr


def test_store_info_csv_and_json(cli, real_copy, tmp_path):
    out = tmp_path / "datasets.csv"
    cli.ok("extract", "--store", real_copy, "--backbone", "hvg", "--dataset", "pc9", "--quiet")
    text = cli.ok("store", "info", real_copy, "--csv", out, env=NO_COLUMNS).stdout
    frame = pd.read_csv(out).set_index("dataset")
    assert frame.loc["pc9", "backbones"] == "hvg, pca" and frame.loc["gbm", "backbones"] == "pca"
    assert frame.loc["pc9", "cells"] == 1505 and frame.loc["gbm", "cells"] == 5000
    assert "hvg, pca" in text
    data = json.loads(cli.ok("store", "info", real_copy, "--json").stdout)
    assert {d["dataset"]: d["backbones"] for d in data["datasets"]} == {"gbm": ["pca"], "pc9": ["hvg", "pca"]}


def test_csv_to_an_unwritable_place_is_one_line(cli, real_store):
    before = snapshot(real_store)
    cli.fails("leaderboard", "--store", real_store, "--csv", "/proc/board.csv", match="cannot write /proc/board.csv")
    cli.fails("store", "info", real_store, "--csv", "/proc/nope/info.csv", match="cannot write")
    cli.fails("probe", "--store", real_store, "--backbone", "pca", "--csv", "/proc/probe.csv", "--quiet",
              match="cannot write /proc/probe.csv")                      # checked before any run is stored
    cli.fails("probe", "--store", real_store, "--backbone", "pca", "--csv", real_store, "--quiet",
              match="is a directory")
    assert snapshot(real_store) == before


def test_tables_off_a_terminal_keep_every_cell_on_one_line(cli, real_copy):
    result = cli.ok("probe", "--store", real_copy, "--backbone", "pca", "--head", "lr", "--head", "mlp", "--quiet",
                    env=NO_COLUMNS)
    run_ids = Store.open(real_copy).sql("SELECT run_id FROM probe_runs ORDER BY created_at DESC LIMIT 2")["run_id"]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "backbone" in line)
    for name in ("backbone", "protocol", "group_by", "macro_f1", "auprc", "seconds", "run_id"):
        assert re.search(rf"[┃|]\s*{name}\s*[┃|]", header), header          # no header split over lines
    for run_id in run_ids:                                                   # every cell whole, on its row
        assert sum(run_id in line and "±" in line for line in lines) == 1, result.stdout
    assert len(header) > 120                         # wider than the old fixed width, not folded into it


def _table_rows(text: str) -> list[list[str]]:
    """The cells of a printed table's rows, each cell's folded lines joined again."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0] or not rows:                 # a new row starts with its rank; a folded line has none
            rows.append(cells)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], cells)]
    return rows


def test_tables_fit_a_terminal(cli, real_store, monkeypatch):
    import scdrugmap.cli_common as common

    monkeypatch.setattr(common, "stdout_is_terminal", lambda: True)
    narrow = cli.ok("leaderboard", "--store", real_store, env={"COLUMNS": "70"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 70
    rows = json.loads(cli.ok("leaderboard", "--store", real_store, "--json").stdout)
    assert [r[-1] for r in _table_rows(narrow)] == [row["run_id"] for row in rows]   # folded, never cut
    wide = cli.ok("leaderboard", "--store", real_store, env={"COLUMNS": "300"}).stdout
    assert max(len(line) for line in wide.splitlines()) < 300 and all(row["run_id"] in wide for row in rows)


# ---- a backbone that covers only some datasets ------------------------------------------------
def _exported(cli, st, backbone, dataset, tmp_path):
    path = tmp_path / f"{backbone}-{dataset}.h5ad"
    cli.ok("export", "--store", st, "--backbone", backbone, "--where", f"dataset = '{dataset}'", "--to", path)
    return path


def test_probe_uses_the_datasets_an_imported_backbone_covers(cli, real_copy, tmp_path):
    """A lab imports a model's embeddings of pc9 only: probe runs on pc9, says gbm was left out and
    how to add it, and the advice works as printed."""
    st = real_copy
    pc9_file = _exported(cli, st, "pca", "pc9", tmp_path)
    cli.ok("import-embeddings", "--store", st, "--dataset", "pc9", "--backbone", "api-model", "--from", pc9_file,
           "--key", "X_pca")
    result = cli.ok("probe", "--store", st, "--backbone", "api-model", "--head", "lr", "--quiet")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    [left_out] = [n for n in notes if "left out" in n]
    assert "backbone 'api-model' has no embeddings of dataset(s) gbm" in left_out
    advice = re.search(r"'(scdrugmap import-embeddings [^']+)'", left_out).group(1)
    assert advice == "scdrugmap import-embeddings --backbone api-model --dataset gbm --from FILE"
    assert any("1 of 2 datasets" in n and "1,505 of 6,505 cells" in n for n in notes)
    run = Store.open(st).sql("SELECT * FROM probe_runs WHERE backbone = 'api-model'").iloc[0]
    assert run["where_sql"] == "dataset IN ('pc9')" and run["n_cells"] == 1505 and list(run["datasets"]) == ["pc9"]
    # the same embeddings give the same scores as pca on pc9 alone
    cli.ok("probe", "--store", st, "--backbone", "pca", "--head", "lr", "--where", "dataset IN ('pc9')", "--quiet")
    board = json.loads(cli.ok("leaderboard", "--store", st, "--json", "--where", "where_sql IS NOT NULL").stdout)
    assert {r["backbone"] for r in board} == {"api-model", "pca"} and len({r["f1"] for r in board}) == 1
    assert {r["cohort"] for r in board} == {"dataset IN ('pc9')"}
    # follow the advice: import gbm's embeddings, then every dataset is probed, with no note
    gbm_file = _exported(cli, st, "pca", "gbm", tmp_path)
    argv = advice.split()[1:]
    cli.ok(*argv[:-1], gbm_file, "--store", st, "--key", "X_pca")
    again = cli.ok("probe", "--store", st, "--backbone", "api-model", "--head", "lr", "--quiet")
    assert "left out" not in again.stderr
    latest = Store.open(st).sql("SELECT * FROM probe_runs WHERE backbone = 'api-model' ORDER BY created_at DESC")
    assert latest["where_sql"].iloc[0] is None and latest["n_cells"].iloc[0] == 6505


def test_probe_uses_the_datasets_an_extracted_backbone_covers(cli, real_copy):
    st = real_copy
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--dataset", "pc9", "--quiet")
    result = cli.ok("probe", "--store", st, "--backbone", "hvg", "--backbone", "pca", "--head", "lr", "--quiet")
    [left_out] = [line for line in result.stderr.splitlines() if "left out" in line]
    advice = re.search(r"'(scdrugmap extract [^']+)'", left_out).group(1)
    assert advice == "scdrugmap extract --backbone hvg --dataset gbm"
    assert "every backbone covers" in result.stderr
    runs = Store.open(st).sql("SELECT backbone, where_sql, n_cells FROM probe_runs WHERE where_sql IS NOT NULL")
    assert set(runs["backbone"]) == {"hvg", "pca"} and set(runs["where_sql"]) == {"dataset IN ('pc9')"}
    assert set(runs["n_cells"]) == {1505}                         # both on the same cells: comparable
    cli.ok(*advice.split()[1:], "--store", st, "--quiet")
    assert "left out" not in cli.ok("probe", "--store", st, "--backbone", "hvg", "--quiet").stderr


@pytest.mark.parametrize("case", ["where-selects-missing", "no-common-dataset", "unknown-backbone",
                                  "cross-on-one-covered-dataset"])
def test_coverage_refusals_are_one_line_and_touch_nothing(cli, real_copy, tmp_path, case):
    st = real_copy
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--dataset", "pc9", "--quiet")
    gbm_file = _exported(cli, st, "pca", "gbm", tmp_path)
    cli.ok("import-embeddings", "--store", st, "--dataset", "gbm", "--backbone", "api-model", "--from", gbm_file,
           "--key", "X_pca")
    before = snapshot(st)
    if case == "where-selects-missing":
        err = cli.fails("probe", "--store", st, "--backbone", "api-model", "--where", "dataset = 'pc9'",
                        match="backbone 'api-model' has no embeddings of dataset(s) pc9")
        assert "'scdrugmap import-embeddings --backbone api-model --dataset pc9 --from FILE'" in err
    elif case == "no-common-dataset":
        err = cli.fails("probe", "--store", st, "--backbone", "api-model", "--backbone", "hvg",
                        match="no dataset has embeddings of every backbone")
        assert "api-model: gbm" in err and "hvg: pc9" in err
    elif case == "cross-on-one-covered-dataset":
        err = cli.fails("probe", "--store", st, "--backbone", "hvg", "--protocol", "cross",
                        match="needs at least 2 datasets")
        assert "only the datasets with embeddings of every backbone asked for are probed: pc9" in err
    else:
        err = cli.fails("probe", "--store", st, "--backbone", "my-model", match="has no embeddings in this store")
        assert "scdrugmap extract --backbone my-model" in err
        assert "scdrugmap import-embeddings --backbone my-model" in err
    assert snapshot(st) == before


# ---- notes once per command -----------------------------------------------------------------
def test_each_note_is_printed_once_per_command(cli, real_copy):
    st = real_copy
    cli.ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    result = cli.ok("probe", "--store", st, "--backbone", "hvg", "--backbone", "pca", "--head", "lr", "--head",
                    "lgbm", "--head", "mlp", "--group-by", "none", "--where", "dataset = 'pc9'", "--quiet")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == len(set(notes)) >= 1
    assert sum("cell-level" in n for n in notes) == 1
    assert "6 run(s)" in result.stderr
    board = cli.ok("leaderboard", "--store", st)
    assert board.stderr.count("note: leaky") == 1 and board.stdout.count("yes") >= 6
