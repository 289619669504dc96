"""An upload in scDrugMap's web format (cell barcode, condition column, gene columns) is
converted, ingested with ingest's checks, extracted and predicted, over HTTP."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("starlette", reason="scdrugmap[serve] is not installed")
pytest.importorskip("uvicorn", reason="scdrugmap[serve] is not installed")

from scdrugmap.store.store import Store  # noqa: E402
from webapp import http, multipart, running, wait_job  # noqa: E402


def test_a_csv_of_pc9_cells_is_predicted(store_copy, tmp_path, pc9):
    import anndata as ad
    import pandas as pd

    from scdrugmap.inference import fit_model

    st = store_copy()
    fit_model(Store.open(st), "pca", "lr", show_progress=False)
    adata = ad.read_h5ad(pc9)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(adata.n_obs, 120, replace=False))
    sub = adata[pick]
    X = sub.X.toarray() if hasattr(sub.X, "toarray") else np.asarray(sub.X)
    keep = X.sum(axis=0) > 0
    table = pd.DataFrame(X[:, keep].astype(np.int64), index=sub.obs_names, columns=sub.var_names[keep])
    table.insert(0, "condition", np.where(sub.obs["response"] == "sensitive", "control", "erlotinib"))
    table.index.name = "barcode"
    content = table.to_csv().encode()
    with running(st, allow_writes=True, upload_dir=tmp_path / "up") as base:
        body, headers = multipart({"dataset": "pc9csv", "label_col": "condition", "sensitive": "control",
                                   "resistant": "erlotinib", "model": "pca-lr"}, "file", "pc9.csv", content)
        r = http(f"{base}/upload", data=body, headers=headers)
        assert r.status == 303, r.text[-400:]
        job = r.headers["Location"]
        assert re.fullmatch(r"/jobs/[0-9a-f]{16}", job)
        status = wait_job(base, job)
        assert status["state"] == "done", status
        page = http(f"{base}{job}").text
        assert "120 cells" in page and "Predictions of pca-lr" in page
    store = Store.open(st)
    row = store.sql("SELECT n_cells, n_sensitive, label_map FROM datasets WHERE dataset = 'pc9csv'").iloc[0]
    assert row["n_cells"] == 120 and row["n_sensitive"] == int((sub.obs["response"] == "sensitive").sum())
    assert json.loads(row["label_map"]) == {"control": "sensitive", "erlotinib": "resistant"}
    assert len(store.sql("SELECT * FROM predictions WHERE dataset = 'pc9csv'")) == 120
    assert [p.suffix for p in (tmp_path / "up").iterdir()] == [".h5ad"]


def test_predict_a_stored_dataset_from_its_page(store_copy, tmp_path):
    from scdrugmap.inference import fit_model
    from scdrugmap.inference import predict as run_predict
    from webapp import form

    st = store_copy()
    fit_model(Store.open(st), "pca", "lr", where="dataset <> 'SimData1'", show_progress=False)
    with running(st, allow_writes=True, upload_dir=tmp_path / "up") as base:
        page = http(f"{base}/datasets/SimData1").text
        assert 'action="/predict"' in page and "<option>pca-lr</option>" in page
        data, headers = form({"dataset": "SimData1", "model": "pca-lr"})
        r = http(f"{base}/predict", data=data, headers=headers)
        assert r.status == 303
        assert wait_job(base, r.headers["Location"])["state"] == "done"
        page = http(f"{base}{r.headers['Location']}").text
        csv_text = http(f"{base}/predictions.csv?model=pca-lr&dataset=SimData1").text
    # per-patient and per-sample rows, with the mean probabilities of predict's own summary
    expected = run_predict(Store.open(st), "pca-lr", "SimData1", show_progress=False).summary
    rows = expected[expected["level"].isin(["patient", "sample"])]
    assert set(rows["level"]) == {"patient", "sample"} and len(rows) >= 3
    for row in rows.itertuples():
        assert f"<td>{row.level}</td><td>{row.group}</td>" in page
        assert f"{row.mean_probability:.3f}" in page
    assert len(csv_text.strip().splitlines()) == 1 + 80
