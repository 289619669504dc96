"""The web app as a person uses it, in Debian's chromium: browse the datasets, run a SQL query
and download its CSV, filter the leaderboard and open a run with its figures, upload the
shared PC9 file and get its predictions, train a probe; no console error, one screenshot per page."""

from __future__ import annotations

import csv
import io
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="scdrugmap[serve] is not installed")
pytest.importorskip("uvicorn", reason="scdrugmap[serve] is not installed")

from browser import browser  # noqa: E402,F401  (the fixture)
from conftest import build_small_store  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402
from webapp import http, running  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from scdrugmap.inference import fit_model

    root = tmp_path_factory.mktemp("served")
    store = build_small_store(root)
    fit_model(Store.open(store), "pca", "lr", show_progress=False)
    with running(store, allow_writes=True, upload_dir=root / "uploads") as base:
        yield base, store


def wait_for(browser, script: str, what: str, limit: float = 120):
    deadline = time.monotonic() + limit
    while not browser.js(script):
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.1)


def no_errors(browser, page: str):
    errors = browser.console_errors()
    assert errors == [], f"{page}: {errors}"
    browser.screenshot(f"serve-{page}")


def test_browse_datasets_sql_leaderboard_and_a_run(served, browser):
    base, store_path = served
    store = Store.open(store_path)
    b = browser
    b.open(f"{base}/")
    names = b.js("return [...document.querySelectorAll('td a')].map(a => a.textContent)")
    assert names == sorted(store.dataset_names())
    no_errors(b, "datasets")

    b.js("document.querySelector('td a').click()")
    wait_for(b, "return document.title.startsWith('SimData1')", "the dataset page")
    counts = store.sql("SELECT label, count(*) AS n FROM cells WHERE dataset = 'SimData1' GROUP BY ALL")
    text = b.js("return document.body.innerText")
    for row in counts.itertuples():
        assert f"{row.label}\t{row.n}" in text
    assert "Cells by sample" in text and "Cells by patient" in text
    no_errors(b, "dataset")

    b.open(f"{base}/sql")
    query = "SELECT dataset, label, count(*) AS cells FROM cohort GROUP BY ALL ORDER BY ALL"
    b.js("document.getElementById('q').value = arguments[0]; document.getElementById('run').click()", query)
    wait_for(b, "return document.getElementById('count') !== null", "the query's result")
    expected = store.sql(query)
    assert b.js("return document.getElementById('count').textContent").startswith(f"{len(expected)} rows")
    assert b.js("return document.querySelectorAll('tbody tr').length") == len(expected)
    no_errors(b, "sql")
    rows = list(csv.DictReader(io.StringIO(http(b.js("return document.getElementById('csv').href")).text)))
    assert [(r["dataset"], r["label"], int(r["cells"])) for r in rows] == list(expected.itertuples(index=False, name=None))

    b.open(f"{base}/leaderboard?metric=auroc&protocol=pooled&bootstrap=100")
    heads = b.js("return [...document.querySelectorAll('th')].map(t => t.textContent)")
    assert {"auroc", "auroc_low", "auroc_high", "run_id"} <= set(heads)
    low, mean, high = (float(b.js(f"return document.querySelector('tbody tr').children[{heads.index(c)}]"
                                  ".textContent")) for c in ("auroc_low", "auroc", "auroc_high"))
    assert low <= mean <= high and low < high
    no_errors(b, "leaderboard")
    b.open(f"{base}/leaderboard?head=mlp")          # a filter that matches no run says so
    assert "no runs with head 'mlp'" in b.js("return document.getElementById('error').textContent")
    b.open(f"{base}/leaderboard?metric=f1")
    run_id = store.sql("SELECT run_id FROM probe_runs")["run_id"][0]
    b.js("document.querySelector('td a[href^=\"/runs/\"]').click()")
    wait_for(b, f"return document.title.startsWith('Run {run_id}')", "the run page")
    wait_for(b, "return [...document.images].every(i => i.complete)", "the figures")
    assert b.js("return [...document.querySelectorAll('img.figure')].filter(i => i.naturalWidth > 300).length") == 1
    assert b.js("return document.querySelectorAll('#results tbody tr').length") == 5          # five splits
    no_errors(b, "run")


def test_upload_pc9_and_get_predictions(served, browser, pc9):
    base, store_path = served
    b = browser
    b.open(f"{base}/upload")
    b.driver.find_element("id", "file").send_keys(str(pc9))
    for field, value in (("dataset", "pc9"), ("label_col", "response"), ("sample_col", "sample_id")):
        b.js(f"document.getElementById('{field}').value = arguments[0]", value)
    b.js("document.getElementById('model').value = 'pca-lr'")
    no_errors(b, "upload")
    start = time.monotonic()
    b.js("document.getElementById('send').click()")
    wait_for(b, "let s = document.getElementById('state'); return s && s.dataset.state === 'done'", "predictions")
    seconds = time.monotonic() - start
    text = b.js("return document.body.innerText")
    assert "1505 cells" in text and "PC9_control" in text and "PC9_erlotinib_day11" in text
    no_errors(b, "predictions")
    cells = list(csv.DictReader(io.StringIO(http(b.js("return document.getElementById('csv').href")).text)))
    assert len(cells) == 1505 and {c["call"] for c in cells} <= {"sensitive", "resistant"}
    # the same probabilities as the predictions stored in the index
    store = Store.open(store_path)
    stored = store.sql("SELECT probability FROM predictions WHERE dataset = 'pc9' ORDER BY \"row\"")
    assert np.allclose([float(c["probability"]) for c in cells], stored["probability"], atol=1e-6)
    print(f"upload-to-predictions of PC9: {seconds:.1f} s")


def test_train_a_probe_in_the_background(served, browser):
    base, store_path = served
    b = browser
    b.open(f"{base}/train")
    b.js("document.querySelector('[name=head]').value = 'lgbm'")
    no_errors(b, "train")
    b.js("document.getElementById('start').click()")
    wait_for(b, "let s = document.getElementById('state'); return s && s.dataset.state === 'done'", "the probe run")
    run_id = b.js("return document.getElementById('run').textContent")
    store = Store.open(store_path)
    assert store.sql("SELECT head FROM probe_runs WHERE run_id = ?", [run_id])["head"][0] == "lgbm"
    no_errors(b, "trained")
    b.js("document.getElementById('run').click()")
    wait_for(b, f"return document.title.startsWith('Run {run_id}')", "the run page")
    no_errors(b, "trained-run")
    b.open(f"{base}/leaderboard?metric=f1")         # shown before the run: not kept once the index changed
    assert run_id in b.js("return document.body.innerText")
