"""store merge: the union without conflicts; conflicts listed (nothing written) or settled by --prefer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import snapshot
from scdrugmap.extract.runner import extract
from scdrugmap.probe.run import run_probe
from scdrugmap.store.exchange import import_embeddings
from scdrugmap.store.ingest import IngestRequest, ingest
from scdrugmap.store.store import Store


def ingest_sim(store, file, name, **extra):
    ingest(store, IngestRequest(file=file, dataset=name, label_col="response", sample_col="sample_id",
                                patient_col="patient_id", **extra))


@pytest.fixture
def lab_b(small_store, tmp_path):
    """Another lab's store: the same SimData1 file (same settings), a new dataset with an extra obs
    column, the hvg baseline and one probe run."""
    data = small_store.parent / "data"
    ctx = Store.open(small_store).datasets().set_index("dataset").loc["SimData1"]
    context = {k: ctx[k] for k in ("drug", "cancer_type", "tissue", "therapy", "regimen")}
    b = tmp_path / "b"
    ingest_sim(b, data / "SimData1.h5ad", "SimData1", context=context)
    new = ad.read_h5ad(data / "SimData2.h5ad")
    new.obs["batch_b"] = np.arange(new.n_obs) % 3
    new.write_h5ad(tmp_path / "new.h5ad")
    ingest_sim(b, tmp_path / "new.h5ad", "NewData")
    extract(Store.open(b), "hvg", chunk_rows=40, show_progress=False)
    run_probe(Store.open(b), "hvg", head="lr", protocol="cross", show_progress=False)
    return b


def test_merge_without_conflicts_is_the_union(cli, small_store, lab_b, tmp_path):
    before = snapshot(small_store), snapshot(lab_b)
    c = tmp_path / "c"
    out = cli.ok("store", "merge", small_store, lab_b, "--into", c).output
    assert "11 datasets, 2 backbones (hvg, pca), 2 probe runs" in out
    assert (snapshot(small_store), snapshot(lab_b)) == before
    m, a, b = Store.open(c), Store.open(small_store), Store.open(lab_b)
    assert len(m.dataset_names()) == 11
    # embeddings copied byte for byte
    ours = "dataset LIKE 'SimData%'"
    np.testing.assert_array_equal(m.load("pca", where=ours)[0], a.load("pca")[0])
    two = "dataset IN ('SimData1', 'NewData')"
    np.testing.assert_array_equal(m.load("hvg", where=two)[0], b.load("hvg", where=two)[0])
    # cells: the union of obs columns; other datasets have NULL in a column they lack
    cells = m.sql("SELECT dataset, count(batch_b) n FROM cells GROUP BY 1 ORDER BY 1")
    assert dict(cells.itertuples(index=False))["NewData"] == 80 and cells["n"].sum() == 80
    pd.testing.assert_frame_equal(m.cells(datasets=["SimData5"]).drop(columns=["batch_b"]),
                                  a.cells(datasets=["SimData5"]))
    # results of both labs, rows unchanged
    pd.testing.assert_frame_equal(m.sql("SELECT * FROM probe_results ORDER BY ALL"),
                                  pd.concat([a.sql("SELECT * FROM probe_results"),
                                             b.sql("SELECT * FROM probe_results")]).sort_values(
                                      list(a.sql("SELECT * FROM probe_results").columns)).reset_index(drop=True))
    assert sorted(m.sql("SELECT backbone FROM probe_runs")["backbone"]) == ["hvg", "pca"]
    assert (c / "models" / "pca").is_dir()
    # the merged store works: a probe on embeddings from both labs
    assert "cross" in cli.ok("probe", "--store", c, "--backbone", "hvg", "--protocol", "cross", "--where", two,
                             "--quiet").output


@pytest.fixture
def conflicting(store_copy, tmp_path):
    """A copy of the small store whose SimData3 was re-ingested from a changed file and whose
    pca embeddings of SimData2 were replaced by imported ones."""
    b = store_copy("b")
    src = Store.open(b).datasets().set_index("dataset").loc["SimData3", "source_path"]
    a = ad.read_h5ad(src)
    a.X = a.X.copy()
    a.X[0, 0] += 1
    a.write_h5ad(tmp_path / "changed.h5ad")
    ingest_sim(b, tmp_path / "changed.h5ad", "SimData3", replace=True)
    X, _ = Store.open(b).load("pca", where="dataset = 'SimData2'")
    np.save(tmp_path / "other.npy", X.astype(np.float32) * 2)
    import_embeddings(Store.open(b), "SimData2", "pca", tmp_path / "other.npy", replace=True)
    return b


def test_conflicts_are_listed_and_nothing_is_written(cli, small_store, conflicting, tmp_path):
    before = snapshot(small_store), snapshot(conflicting)
    err = cli.fails("store", "merge", small_store, conflicting, "--into", tmp_path / "c", match="merge conflicts")
    assert "2 merge conflicts" in err
    assert "dataset 'SimData3': source sha256 differs" in err
    assert "pca x SimData2: provenance differs (params, dtype, origin)" in err
    assert "--prefer A or --prefer B" in err
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]
    assert (snapshot(small_store), snapshot(conflicting)) == before


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_prefer_keeps_one_side(cli, small_store, conflicting, tmp_path, prefer):
    c = tmp_path / "c"
    result = cli.ok("store", "merge", small_store, conflicting, "--into", c, "--prefer", prefer)
    assert f"conflict resolved for {prefer}" in result.output
    kept = Store.open(small_store if prefer == "A" else conflicting)
    m = Store.open(c)
    np.testing.assert_array_equal(m.load("pca", datasets=["SimData2"])[0], kept.load("pca", datasets=["SimData2"])[0])
    # SimData3 comes with its own side's embeddings: A's pca, or none (B re-ingested it and has none)
    assert ("SimData3" in set(m.provenance("pca")["dataset"])) == (prefer == "A")
    pd.testing.assert_frame_equal(m.cells(datasets=["SimData3"]), kept.cells(datasets=["SimData3"]))
    assert m.datasets().set_index("dataset").loc["SimData3", "source_sha256"] == \
        kept.datasets().set_index("dataset").loc["SimData3", "source_sha256"]
    origin = m.provenance("pca").set_index("dataset").loc["SimData2", "origin"]
    assert origin == ("extracted" if prefer == "A" else "external")
    # A's probe run used A's SimData3 (B's re-ingest dropped it from B): kept only with --prefer A
    runs = m.sql("SELECT count(*) n FROM probe_runs")["n"][0]
    assert runs == (1 if prefer == "A" else 0)
    if prefer == "B":
        assert "dropped probe run" in result.stderr


def test_merge_errors(cli, small_store, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cli.fails("store", "merge", small_store, small_store, "--into", tmp_path / "c", match="same store")
    cli.fails("store", "merge", small_store, tmp_path / "none", "--into", tmp_path / "c", match="does not exist")
    cli.fails("store", "merge", small_store, small_store.parent / "data", "--into", tmp_path / "c",
              match="not a scdrugmap store")
    cli.fails("store", "merge", small_store, tmp_path / "none", "--into", tmp_path / "full", match="does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
