"""What killed commands leave behind is finished, reclaimed or reported, never recomputed or kept."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import GBM, ROOT, need_shared
from scdrugmap.store import arrays
from scdrugmap.store import store as store_module
from scdrugmap.store.cleanup import reclaimable
from scdrugmap.store.store import Store

sys.path.insert(0, str(ROOT / "tests" / "plugins"))
import slow_backbone  # noqa: E402,F401  (registers slow-hvg in this process)


@pytest.fixture
def st(store_copy):
    return store_copy()


def test_extraction_killed_before_its_commit_is_committed_without_recomputing(st, tmp_path, monkeypatch):
    from scdrugmap.extract.runner import extract

    log = tmp_path / "chunks.log"
    monkeypatch.setenv("SLOW_HVG_LOG", str(log))

    def killed(*args, **kwargs):                     # the process dies after the rename, before the index write
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_module, "commit_array", killed)
        with pytest.raises(KeyboardInterrupt):
            extract(Store.open(st), "slow-hvg", datasets=["SimData1"], chunk_rows=20, show_progress=False)
    assert len(log.read_text().split()) == 4                        # 80 cells, 4 chunks computed
    [staging] = (st / "embeddings.zarr" / arrays.STAGING).glob(arrays.staging_name("slow-hvg", "SimData1", "*"))
    final = (staging / arrays.FINAL).read_text()
    assert (st / "embeddings.zarr" / final / "zarr.json").is_file()     # the finished array, not yet in the index
    left = reclaimable(Store.open(st))
    assert [x["chunks_done"] for x in left["interrupted_extractions"]] == [4]
    assert left["unreferenced_arrays"] == []                         # it is claimed by its staging, not an orphan

    log.unlink()
    [report] = extract(Store.open(st), "slow-hvg", datasets=["SimData1"], chunk_rows=20, show_progress=False)
    assert report.status == "extracted" and report.resumed_chunks == 4 and report.computed_chunks == 0
    assert not log.exists()                                          # nothing recomputed
    store = Store.open(st)
    assert store.provenance("slow-hvg")["array_path"].tolist() == [final]
    assert not list((st / "embeddings.zarr" / arrays.STAGING).glob("*"))
    X, _ = store.load("slow-hvg", where="dataset = 'SimData1'")
    extract(store, "hvg", datasets=["SimData1"], show_progress=False)
    np.testing.assert_array_equal(X, store.load("hvg", where="dataset = 'SimData1'")[0])


def test_unreferenced_arrays_are_reported_then_reclaimed(cli, st):
    prov = Store.open(st).provenance("pca")
    rel = prov["array_path"].iloc[0]
    orphan = rel.rsplit("/", 1)[0] + "/0123456789ab"
    shutil.copytree(st / "embeddings.zarr" / rel, st / "embeddings.zarr" / orphan)
    data = json.loads(cli.ok("store", "info", st, "--json").output)["reclaimable"]
    assert [x["path"] for x in data["unreferenced_arrays"]] == [f"embeddings.zarr/{orphan}"]
    assert data["bytes"] > 0
    out = cli.ok("store", "info", st).output
    assert f"reclaimable: embeddings.zarr/{orphan}" in out and "removed by the next extract" in out
    cli.ok("extract", "--store", st, "--backbone", "pca", "--quiet")     # skips every dataset, reclaims the orphan
    assert not (st / "embeddings.zarr" / orphan).exists()
    assert (st / "embeddings.zarr" / rel).exists()
    assert json.loads(cli.ok("store", "info", st, "--json").output)["reclaimable"]["bytes"] == 0


def test_stale_work_folders_beside_a_store_are_reported(cli, st):
    stale = st.parent / f".{st.name}.creating-deadbeef"
    (stale / "store").mkdir(parents=True)
    (stale / "store" / "index.duckdb").write_bytes(b"x" * 1000)
    left = json.loads(cli.ok("store", "info", st, "--json").output)["reclaimable"]
    assert [x["path"] for x in left["stale_work_folders"]] == [str(stale)]
    assert "left by a killed command" in cli.ok("store", "info", st).output
    gbm = need_shared(GBM)
    cli.ok("ingest", gbm, "--store", st, "--dataset", "gbm", "--label-col", "condition", "--sensitive", "ctrl",
           "--resistant", "panobinostat", "--quiet")
    assert not stale.exists()                    # the next ingest into the store removed it


def test_a_work_folder_in_use_is_not_stale(tmp_path):
    from scdrugmap.store.locks import stale_work_dirs, work_dir

    with work_dir(tmp_path / "dest", "packing") as work:
        assert work.is_dir() and stale_work_dirs(tmp_path, "dest") == []
        # another process cleaning up finds it locked and keeps it
        with work_dir(tmp_path / "dest", "packing") as other:
            assert work.is_dir() and other != work
    assert sorted(p.name for p in tmp_path.iterdir()) == []
