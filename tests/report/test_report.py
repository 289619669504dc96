"""Stored out-of-fold scores, bootstrap intervals, paired comparison, and the HTML report as a
person sees it (Debian's chromium): on the demo's store (4 simulated datasets, hvg and pca,
three heads, pooled and cross, plus a cell-level run)."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from browser import ARTIFACTS, browser  # noqa: F401  (the fixture)
from conftest import snapshot
from scdrugmap.demo import run_demo
from scdrugmap.probe.confidence import add_intervals, compare_runs, run_interval
from scdrugmap.probe.metrics import score
from scdrugmap.probe.leaderboard import leaderboard
from scdrugmap.store.store import Store


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    run_demo(out, seed=0, echo=lambda *_: None)
    return out


def _runs(store, where):
    return list(store.sql(f"SELECT run_id FROM probe_runs WHERE {where} ORDER BY backbone, head")["run_id"])


def test_out_of_fold_scores_recompute_the_stored_metrics(demo):
    store = Store.open(demo / "store")
    results = store.sql("SELECT * FROM probe_results WHERE status <> 'one-class-train' ORDER BY run_id, split")
    preds = store.sql('SELECT * FROM probe_predictions ORDER BY run_id, split, dataset, "row"')
    assert str(store.sql("SELECT typeof(score) AS t FROM probe_predictions LIMIT 1")["t"][0]) == "FLOAT"
    for r in results.itertuples(index=False):
        part = preds[(preds["run_id"] == r.run_id) & (preds["split"] == r.split)]
        assert len(part) == r.n_test and int(part["label"].sum()) == r.n_test_positive
        again = score(part["label"].to_numpy(), part["score"].to_numpy(dtype=float))
        assert again["f1"] == pytest.approx(r.f1, abs=0.01)
        if np.isfinite(r.auroc):
            assert again["auroc"] == pytest.approx(r.auroc, abs=1e-3)
    # each pooled run scores every cell exactly once; labels match the cells table
    pooled = _runs(store, "protocol = 'pooled'")[0]
    mine = preds[preds["run_id"] == pooled].merge(store.cells(columns=["label"]), on=["dataset", "row"])
    assert not mine.duplicated(["dataset", "row"]).any()
    assert ((mine["label_x"] == 1) == (mine["label_y"] == "resistant")).all()


def test_intervals_bracket_the_mean_and_are_seeded(demo):
    store = Store.open(demo / "store")
    board = leaderboard(store, metric="auroc")
    a = add_intervals(store, board, "auroc", n=100, seed=1)
    b = add_intervals(store, board, "auroc", n=100, seed=1)
    c = add_intervals(store, board, "auroc", n=100, seed=2)
    assert a.equals(b) and not a["auroc_low"].equals(c["auroc_low"])
    ok = a.dropna(subset=["auroc_low"])
    assert len(ok) == len(a)
    assert (ok["auroc_low"] <= ok["auroc_high"]).all()
    assert ((ok["auroc_low"] <= ok["auroc"] + 0.02) & (ok["auroc"] - 0.02 <= ok["auroc_high"])).all()
    # a cell-level run's interval (cells resampled) is narrower than the grouped run's (patients resampled)
    leaky = run_interval(store, _runs(store, "group_by = 'none'")[0], "f1", n=200)
    grouped = run_interval(store, _runs(store, "group_by = 'patient' AND backbone = 'pca' AND head = 'lr'")[0],
                           "f1", n=200)
    assert leaky[1] - leaky[0] < grouped[1] - grouped[0]


def test_compare_is_paired_and_refuses_other_splits(demo, cli):
    st = demo / "store"
    store = Store.open(st)
    lr, lgbm = (_runs(store, f"protocol = 'pooled' AND group_by = 'patient' AND backbone = 'hvg' AND head = '{h}'")[0]
                for h in ("lr", "lgbm"))
    result = compare_runs(store, lr, lgbm, metric="auroc", n=300, seed=0)
    assert result.low <= result.difference <= result.high
    assert len(result.per_split) >= 2 and 0 < result.wilcoxon_p <= 1 and 0 < result.sign_p <= 1
    assert result.difference == pytest.approx(result.a - result.b)
    before = snapshot(st)
    out = cli.ok("compare", "--store", st, lr, lgbm, "--bootstrap", "100").output
    assert "95 % paired bootstrap interval" in out and "Wilcoxon" in out
    leaky = _runs(store, "group_by = 'none'")[0]
    cli.fails("compare", "--store", st, lr, leaky, match="not comparable")
    cross = _runs(store, "protocol = 'cross' AND backbone = 'hvg' AND head = 'lr'")[0]
    cli.fails("compare", "--store", st, lr, cross, match="not comparable")
    cli.fails("compare", "--store", st, lr, "nosuchrun", match="no probe run")
    cli.fails("compare", "--store", st, lr, lgbm, "--metric", "nope", match="unknown metric")
    assert snapshot(st) == before


try:
    import umap  # noqa: F401
    MAP = "UMAP"
except ImportError:
    MAP = "PCA"

SECTIONS = ("leaderboard", "curves", "cross", "leakage", "maps", "datasets", "provenance")


def _check_page(browser, path, sections, prefix):  # noqa: F811
    browser.open(path.resolve().as_uri())
    assert browser.console_errors() == []
    found = browser.js("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert found == list(sections)
    images = browser.js("return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, "
                        "i.naturalHeight, i.getBoundingClientRect().width])")
    assert images and all(done and w > 100 and h > 100 and shown > 100 for _, done, w, h, shown in images), images
    # nothing fetched from elsewhere: every image is embedded
    assert browser.js("return Array.from(document.images).every(i => i.src.startsWith('data:image/png'))")
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    for section in sections:
        element = browser.driver.find_element(By.ID, section)
        browser.js("arguments[0].scrollIntoView()", element)
        element.screenshot(str(ARTIFACTS / f"{prefix}-{section}.png"))
        assert (ARTIFACTS / f"{prefix}-{section}.png").stat().st_size > 1000
    return images


def test_report_in_a_real_browser(demo, browser, cli, tmp_path):  # noqa: F811
    page = demo / "report.html"                     # written by the demo
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    images = _check_page(browser, page, SECTIONS, "report")
    alts = [a for a, *_ in images]
    # ROC/PR per protocol and grouping (pooled by patient, cell-level, cross), a cross-dataset matrix,
    # the leakage gap, one map per backbone
    assert sum(a.startswith("ROC and PR") for a in alts) == 3
    assert sum(a.startswith("f1 per held-out dataset") for a in alts) == 1
    assert "leakage gap" in alts
    # the demo's report: UMAP maps where scdrugmap[umap] is installed (the test install has it)
    assert [a.split(":")[0] for a in alts if f"{MAP} of its embeddings" in a] == ["hvg", "pca"]
    assert 'id="predictions"' not in text            # no predictions table: no such section

    # predictions of a saved model (scdrugmap fit, then predict) add the per-patient section
    st = tmp_path / "st"
    shutil.copytree(demo / "store", st)
    cli.ok("fit", "--store", st, "--backbone", "pca", "--head", "lr", "--where", "dataset <> 'SimData1'", "--quiet")
    cli.ok("predict", "--store", st, "--model", "pca-lr", "--dataset", "SimData1", "--quiet")
    out = tmp_path / "with-predictions.html"
    cli.ok("report", "--store", st, "--out", out, "--bootstrap", "50", "--map-cells", "500", "--map", "pca", "--quiet")
    images = _check_page(browser, out, (*SECTIONS, "predictions"), "report-predictions")
    assert "predictions per patient" in [a for a, *_ in images]
    assert sum("PCA of its embeddings" in a for a, *_ in images) == 2
    assert "500 of 2,400 cells (seed 0)" in out.read_text()


def test_report_mistakes_are_one_line_and_leave_the_store(cli, store_copy, tmp_path, monkeypatch):
    st = store_copy()
    before = snapshot(st)
    monkeypatch.setitem(sys.modules, "umap", None)           # as without the scdrugmap[umap] extra
    cli.fails("report", "--store", st, "--out", tmp_path / "r.html", "--map", "umap", match="scdrugmap[umap]")
    monkeypatch.undo()
    cli.fails("report", "--store", st, "--out", tmp_path / "missing" / "r.html", match="does not exist")
    cli.fails("report", "--store", st, "--out", tmp_path, match="is a directory")
    cli.fails("report", "--store", st, "--out", tmp_path / "r.html", "--metric", "nope", match="unknown metric")
    cli.fails("leaderboard", "--store", st, "--bootstrap", "-1", match="--bootstrap")
    cli.fails("report", "--store", st, "--out", "/proc/r.html", match="cannot write r.html in /proc")  # before the work
    assert snapshot(st) == before
    assert not (tmp_path / "r.html").exists()
    # a damaged store (an embedding array deleted): the one-line error of every reader, no report
    shutil.rmtree(st / "embeddings.zarr" / "pca")
    cli.fails("report", "--store", st, "--out", tmp_path / "r.html", "--quiet", match="is missing")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.html.tmp").exists()


def test_leaderboard_prints_intervals(cli, small_store):
    out = cli.ok("leaderboard", "--store", small_store, "--bootstrap", "50", "--ci-seed", "3").output
    assert "f1_low" in out and "f1_high" in out
    assert "f1_low" not in cli.ok("leaderboard", "--store", small_store).output
