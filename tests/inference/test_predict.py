"""scdrugmap fit / models / predict: saved heads are data, predict exactly what the fitted head
predicts, carry their provenance, refuse mismatched embeddings, and travel with pack and merge."""

from __future__ import annotations

import json
import re

import duckdb
import numpy as np
import pandas as pd
import pytest

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.inference import fit_model, predict
from scdrugmap.inference.predict import bootstrap_mean_ci, provenance_mismatch, summarise
from scdrugmap.inference.serialize import load_estimator, positive_proba
from scdrugmap.store.store import Store

TRAIN = "dataset <> 'SimData10'"
NEW = "SimData10"


@pytest.mark.parametrize("head", ["lr", "lgbm", "mlp"])
def test_saved_head_predicts_exactly_what_the_fitted_head_does(store_copy, head):
    path = store_copy()
    store = Store.open(path)
    m = fit_model(store, "pca", head, where=TRAIN, name=f"m-{head}", show_progress=False)
    assert m.n_cells == 720 and NEW not in m.datasets
    folder = path / m.folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", "head.txt" if head == "lgbm"
                                                              else "head.npz"])
    # no pickle anywhere: every array loads with allow_pickle=False
    if head != "lgbm":
        with np.load(folder / "head.npz", allow_pickle=False) as data:
            assert all(data[k].dtype != object for k in data.files)

    result = predict(store, f"m-{head}", NEW, show_progress=False)
    X, cells = store.load("pca", datasets=[NEW], dtype=np.float32)
    expected = positive_proba(m.estimator, X).astype(np.float32)
    assert np.array_equal(result.cells["probability"].to_numpy(), expected)
    stored = store.sql('SELECT "row", probability, call FROM predictions WHERE model = ? ORDER BY "row"',
                       [f"m-{head}"])
    assert np.array_equal(stored["probability"].to_numpy(np.float32), expected)
    assert list(stored["call"]) == ["resistant" if p >= 0.5 else "sensitive" for p in expected]
    if head == "lr":     # the held-out dataset's resistant cells score higher than its sensitive ones
        labels = cells["label"].to_numpy()
        assert expected[labels == "resistant"].mean() > expected[labels == "sensitive"].mean() + 0.1


def test_fit_records_provenance_and_the_cv_scores_of_the_same_configuration(store_copy, cli):
    path = store_copy()
    cli.ok("fit", "--store", path, "--backbone", "pca", "--head", "lr", "--name", "all-lr")
    row = Store.open(path).sql("SELECT * FROM models WHERE name = 'all-lr'").iloc[0]
    run = Store.open(path).sql("SELECT run_id FROM probe_runs WHERE head = 'lr'")["run_id"].iloc[0]
    cv = json.loads(row["cv_scores"])
    assert [c["run_id"] for c in cv] == [run] and 0.5 < cv[0]["auroc"] <= 1
    prov = json.loads(row["provenance"])
    assert sorted(prov) == sorted(row["datasets"]) and len(prov) == 10
    index = Store.open(path).provenance("pca").set_index("dataset")
    assert prov["SimData3"]["params"] == index.loc["SimData3", "params"]
    assert json.loads(row["params"])["estimator"] == "LogisticRegression" and row["seed"] == 0
    out = cli.ok("models", "--store", path).output
    assert "all-lr" in out and "F1" in out
    res = cli.ok("predict", "--store", path, "--model", "all-lr", "--dataset", "SimData3")
    assert "in-sample" in res.stderr         # a training dataset: said so
    # another seed is another configuration: no CV scores claimed for it
    cli.ok("fit", "--store", path, "--backbone", "pca", "--head", "lr", "--name", "s1", "--seed", "1")
    assert json.loads(Store.open(path).sql("SELECT cv_scores FROM models WHERE name = 's1'").iloc[0, 0]) == []
    # --replace: the new head's folder replaces the old one
    cli.ok("fit", "--store", path, "--backbone", "pca", "--head", "lgbm", "--name", "s1", "--replace")
    assert Store.open(path).sql("SELECT head FROM models WHERE name = 's1'")["head"].tolist() == ["lgbm"]
    assert [p.name[:3] for p in (path / "models" / "heads").iterdir()].count("s1-") == 1
    cli.ok("store", "verify", path)


def test_predict_cli_writes_files_and_summaries(store_copy, cli, tmp_path):
    path = store_copy()
    cli.ok("fit", "--store", path, "--backbone", "pca", "--where", TRAIN, "--name", "m")
    res = cli.ok("predict", "--store", path, "--model", "m", "--dataset", NEW, "--csv", tmp_path / "c.csv",
                 "--parquet", tmp_path / "c.parquet", "--summary-csv", tmp_path / "s.csv")
    assert "per patient" in res.output and "per sample" in res.output and "cells/s" in res.stderr
    cells = pd.read_csv(tmp_path / "c.csv")
    assert len(cells) == 80 and set(cells["call"]) <= {"resistant", "sensitive"}
    assert pd.read_parquet(tmp_path / "c.parquet")["probability"].tolist() == pytest.approx(
        cells["probability"].tolist(), abs=1e-6)
    summary = pd.read_csv(tmp_path / "s.csv")
    per_sample = summary[summary["level"] == "sample"].set_index("group")
    assert per_sample["n_cells"].sum() == 80
    for group, part in cells.groupby("sample"):
        s = per_sample.loc[group]
        assert s["mean_probability"] == pytest.approx(part["probability"].mean(), abs=1e-6)
        assert s["fraction_resistant"] == pytest.approx((part["call"] == "resistant").mean())
        assert s["ci_low"] <= s["mean_probability"] <= s["ci_high"]
    # a subset replaces only its own cells' predictions
    cli.ok("predict", "--store", path, "--model", "m", "--dataset", NEW, "--where", '"row" < 10')
    assert Store.open(path).sql("SELECT count(*) AS n FROM predictions")["n"].iloc[0] == 80


def test_predictions_do_not_use_labels(store_copy):
    path = store_copy()
    store = Store.open(path)
    fit_model(store, "pca", "lr", where=TRAIN, name="m", show_progress=False)
    before = predict(store, "m", NEW, show_progress=False)
    with duckdb.connect(str(path / "index.duckdb")) as con:
        con.execute("UPDATE cells SET label = 'sensitive', label_raw = 'x' WHERE dataset = ?", [NEW])
    after = predict(store, "m", NEW, show_progress=False)
    assert np.array_equal(before.cells["probability"], after.cells["probability"])
    pd.testing.assert_frame_equal(before.summary, after.summary)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = rng.random(500)
    a = bootstrap_mean_ci(values, np.random.default_rng(7))
    assert a == bootstrap_mean_ci(values, np.random.default_rng(7))
    assert a != bootstrap_mean_ci(values, np.random.default_rng(8))
    assert a[0] < values.mean() < a[1]
    # about mean +- 1.96 standard errors
    se = values.std() / np.sqrt(len(values))
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.15)
    cells = pd.DataFrame({"dataset": "d", "sample": ["s1"] * 300 + ["s2"] * 200, "patient": None,
                          "probability": values, "call": np.where(values >= 0.5, "resistant", "sensitive")})
    one = summarise(cells, seed=3)
    other = summarise(cells[cells["sample"] == "s2"], seed=3)    # a group's interval ignores the others
    assert set(one["level"]) == {"dataset", "sample"}
    s2 = one[(one["level"] == "sample") & (one["group"] == "s2")].iloc[0]
    s2_alone = other[other["level"] == "sample"].iloc[0]
    assert (s2["ci_low"], s2["ci_high"]) == (s2_alone["ci_low"], s2_alone["ci_high"])


# ---- refusals ---------------------------------------------------------------------------------
def _prov_row(**kw):
    row = {"dim": 50, "checkpoint_sha256": "aaa", "origin": "extracted",
           "params": json.dumps({"panel_sha256": "p1", "space_id": "pca:f1", "genes_matched": 900,
                                 "model_dir": "/lab/a/ckpt", "batch_size": 64})}
    row.update(kw)
    return row


def test_provenance_comparison():
    trained = {"A": _prov_row(), "B": _prov_row()}
    assert provenance_mismatch(trained, _prov_row(), "gf", "new") is None
    # per-dataset facts, run settings and the checkpoint's folder may differ
    same = _prov_row(params=json.dumps({"panel_sha256": "p1", "space_id": "pca:f1", "genes_matched": 12,
                                        "model_dir": "/other/place/ckpt", "batch_size": 8}))
    assert provenance_mismatch(trained, same, "gf", "new") is None
    assert "checkpoint" in provenance_mismatch(trained, _prov_row(checkpoint_sha256="bbb"), "gf", "new")
    assert "50 features" in provenance_mismatch(trained, _prov_row(dim=64), "gf", "new")
    other_fit = _prov_row(params=json.dumps({"panel_sha256": "p1", "space_id": "pca:f2"}))
    assert "space_id" in provenance_mismatch(trained, other_fit, "gf", "new")
    assert "external" in provenance_mismatch(trained, _prov_row(origin="external"), "gf", "new")


def test_user_errors_leave_the_store_as_it_was(store_copy, cli, tmp_path):
    path = store_copy()
    cli.ok("fit", "--store", path, "--backbone", "pca", "--where", TRAIN, "--name", "m")
    before = snapshot(path)
    cli.fails("fit", "--store", path, "--backbone", "pca", "--name", "m", match="exists")
    cli.fails("fit", "--store", path, "--backbone", "pca", "--head", "nope", match="unknown head")
    cli.fails("fit", "--store", path, "--backbone", "pca", "--where", "label = 'resistant'", match="both sensitive")
    cli.fails("fit", "--store", path, "--backbone", "hvg", match="no embeddings")
    cli.fails("fit", "--store", path, "--backbone", "pca", "--name", "../x", match="invalid model name")
    for head, param in (("lr", "C=abc"), ("lr", "C=-1"), ("mlp", "alpha=x"), ("lgbm", "num_leaves=abc"),
                        ("lgbm", "num_leaves=1")):            # scikit-learn's and LightGBM's own checks, one line
        cli.fails("fit", "--store", path, "--backbone", "pca", "--head", head, "--param", param, "--name", "p",
                  "--quiet", match=f"invalid parameter for head '{head}'")
    cli.fails("predict", "--store", path, "--model", "nope", "--dataset", NEW, match="no model 'nope'")
    cli.fails("predict", "--store", path, "--model", "m", "--dataset", "nope", match="unknown dataset")
    cli.fails("predict", "--store", path, "--model", "m", "--dataset", NEW, "--where", "row < 0", match="matches no")
    cli.fails("predict", "--store", path, "--model", "m", "--dataset", NEW, "--csv", tmp_path / "no" / "x.csv",
              match="does not exist")
    assert snapshot(path) == before
    # the new dataset's embeddings made with another checkpoint: refused, nothing written
    with duckdb.connect(str(path / "index.duckdb")) as con:
        con.execute("UPDATE provenance SET checkpoint_sha256 = 'f00d' WHERE dataset = ?", [NEW])
    before = snapshot(path)
    cli.fails("predict", "--store", path, "--model", "m", "--dataset", NEW, match="checkpoint f00d")
    assert snapshot(path) == before


def test_lora_embeddings_of_a_dataset_outside_the_run_are_refused_in_one_line(store_copy, cli):
    path = store_copy()
    name = "pca+lora:abc123"
    with duckdb.connect(str(path / "index.duckdb")) as con:      # as 'finetune --export-embeddings' leaves them
        con.execute("INSERT INTO provenance SELECT ? AS backbone, * EXCLUDE (backbone) FROM provenance "
                    "WHERE backbone = 'pca' AND dataset <> ?", [name, NEW])
    cli.ok("fit", "--store", path, "--backbone", name, "--where", TRAIN, "--name", "lora")
    before = snapshot(path)
    cli.fails("predict", "--store", path, "--model", "lora", "--dataset", NEW, match="predict with the run itself")
    assert snapshot(path) == before


def test_a_changed_head_file_is_found_by_verify_and_refused_by_predict(store_copy, cli):
    path = store_copy()
    cli.ok("fit", "--store", path, "--backbone", "pca", "--head", "lgbm", "--name", "m")
    cli.ok("store", "verify", path)
    text = next((path / "models" / "heads").glob("m-*/head.txt"))
    changed = re.sub(r"leaf_value=\S+", "leaf_value=0.5", text.read_text(), count=1)   # one leaf, still valid
    assert changed != text.read_text()
    text.write_text(changed)
    err = cli.fails("store", "verify", path, match="failed verification")
    assert "head.txt: modified" in err
    cli.fails("predict", "--store", path, "--model", "m", "--dataset", NEW, match="model 'm' is damaged")


def test_object_arrays_are_never_unpickled(tmp_path):
    np.savez(tmp_path / "head.npz", **{"clf.coef_": np.array([{"a": 1}], dtype=object)})
    entry = {"kind": "sklearn", "file": "head.npz",
             "steps": [{"name": "clf", "class": "LogisticRegression", "params": {}, "scalars": {},
                        "arrays": ["coef_"], "lists": {}}]}
    with pytest.raises(UserError, match="pickle"):
        load_estimator(tmp_path, entry)
    entry["steps"][0]["class"] = "os.system"
    with pytest.raises(UserError, match="unknown estimator class"):
        load_estimator(tmp_path, entry)


# ---- travelling -------------------------------------------------------------------------------
def test_models_and_predictions_travel_in_a_pack(store_copy, cli, tmp_path):
    path = store_copy()
    cli.ok("fit", "--store", path, "--backbone", "pca", "--head", "mlp", "--where", TRAIN, "--name", "m")
    cli.ok("predict", "--store", path, "--model", "m", "--dataset", NEW)
    cli.ok("store", "pack", path, tmp_path / "p.tar")
    cli.ok("store", "unpack", tmp_path / "p.tar", tmp_path / "there")
    there = Store.open(tmp_path / "there")
    assert there.sql("SELECT count(*) AS n FROM predictions")["n"].iloc[0] == 80
    a = predict(Store.open(path), "m", NEW, show_progress=False).cells["probability"]
    b = predict(there, "m", NEW, show_progress=False).cells["probability"]
    assert np.array_equal(a, b)


def test_merge_carries_models_and_predictions(store_copy, cli, tmp_path):
    a, b = store_copy("a"), store_copy("b")
    cli.ok("fit", "--store", a, "--backbone", "pca", "--where", TRAIN, "--name", "ma")
    cli.ok("predict", "--store", a, "--model", "ma", "--dataset", NEW)
    cli.ok("fit", "--store", b, "--backbone", "pca", "--head", "lgbm", "--where", TRAIN, "--name", "mb")
    cli.ok("predict", "--store", b, "--model", "mb", "--dataset", NEW)
    cli.ok("store", "merge", a, b, "--into", tmp_path / "m")
    merged = Store.open(tmp_path / "m")
    assert list(merged.sql("SELECT name FROM models ORDER BY name")["name"]) == ["ma", "mb"]
    counts = merged.sql("SELECT model, count(*) AS n FROM predictions GROUP BY ALL ORDER BY model")
    assert counts["n"].tolist() == [80, 80]
    cli.ok("store", "verify", tmp_path / "m")
    assert np.array_equal(predict(merged, "mb", NEW, show_progress=False).cells["probability"],
                          predict(Store.open(b), "mb", NEW, show_progress=False).cells["probability"])
    # the same name for two different heads is a conflict; --prefer keeps one side's head and predictions
    cli.ok("fit", "--store", b, "--backbone", "pca", "--seed", "5", "--where", TRAIN, "--name", "ma")
    cli.fails("store", "merge", a, b, "--into", tmp_path / "m2", match="model 'ma': a different head")
    assert not (tmp_path / "m2").exists()
    cli.ok("store", "merge", a, b, "--into", tmp_path / "m3", "--prefer", "B")
    m3 = Store.open(tmp_path / "m3")
    assert m3.sql("SELECT seed FROM models WHERE name = 'ma'")["seed"].iloc[0] == 5
    assert m3.sql("SELECT count(*) AS n FROM predictions WHERE model = 'ma'")["n"].iloc[0] == 0
    assert len(list((tmp_path / "m3" / "models" / "heads").iterdir())) == 2
    cli.ok("store", "verify", tmp_path / "m3")


def test_real_glioblastoma_held_out_patient(gbm, cli, tmp_path):
    """Real data: a head fitted on four glioblastoma patients scores the fifth, whose treated
    cells get a higher predicted probability than its control cells."""
    st = tmp_path / "st"
    cli.ok("ingest", gbm, "--store", st, "--dataset", "gbm", "--label-col", "condition", "--sensitive", "ctrl",
           "--resistant", "panobinostat", "--patient-col", "patient_id", "--quiet")
    cli.ok("extract", "--store", st, "--backbone", "pca", "--quiet")
    cli.ok("fit", "--store", st, "--backbone", "pca", "--where", "patient <> 'PW040'", "--name", "gbm4")
    result = predict(Store.open(st), "gbm4", "gbm", where="patient = 'PW040'", show_progress=False)
    cells = result.cells
    assert len(cells) == 1000 and set(cells["patient"]) == {"PW040"}
    treated = cells.loc[cells["label"] == "resistant", "probability"].mean()
    control = cells.loc[cells["label"] == "sensitive", "probability"].mean()
    assert treated > control + 0.1, (treated, control)
    patient = result.summary[result.summary["level"] == "patient"].iloc[0]
    assert patient["group"] == "PW040" and patient["n_cells"] == 1000
    assert patient["ci_low"] < patient["mean_probability"] < patient["ci_high"]


def test_strip_paths_strips_the_models_provenance_and_predict_still_matches(store_copy, cli, tmp_path):
    """A checkpoint folder recorded in provenance: --strip-paths keeps its name only, in the model's
    copy too, and the stripped store still predicts (paths are compared by file name)."""
    path = store_copy()
    with duckdb.connect(str(path / "index.duckdb")) as con:
        con.execute("""UPDATE provenance SET params = json_merge_patch(params, '{"model_dir": "/home/lab-a/ckpt"}')""")
    cli.ok("fit", "--store", path, "--backbone", "pca", "--where", TRAIN, "--name", "m")
    assert "/home/lab-a" in Store.open(path).sql("SELECT provenance FROM models").iloc[0, 0]
    cli.ok("store", "pack", path, tmp_path / "p.tar", "--strip-paths")
    cli.ok("store", "unpack", tmp_path / "p.tar", tmp_path / "there")
    there = Store.open(tmp_path / "there")
    provenance = json.loads(there.sql("SELECT provenance FROM models").iloc[0, 0])
    assert "/home/lab-a" not in json.dumps(provenance)
    assert json.loads(provenance["SimData1"]["params"])["model_dir"] == "ckpt"
    # the receiving lab's checkpoint lives elsewhere: same file name, so the same checkpoint
    with duckdb.connect(str(tmp_path / "there" / "index.duckdb")) as con:
        con.execute("""UPDATE provenance SET params = json_merge_patch(params, '{"model_dir": "/srv/b/ckpt"}')
                       WHERE dataset = ?""", [NEW])
    cli.ok("predict", "--store", tmp_path / "there", "--model", "m", "--dataset", NEW)
