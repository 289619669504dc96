"""Two ``scdrugmap extract`` processes on one store and backbone, on the real PC9 and glioblastoma
data: one extracts, the other stops with one line and touches nothing; and staging directories
of different (backbone, dataset) pairs never collide."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import Cli, ingest_pc9_and_gbm, slow_env, snapshot, wait_for
from scdrugmap.store import arrays
from scdrugmap.store.cleanup import _staging_dirs, reclaim, reclaimable
from scdrugmap.store.store import Store

CLI = [sys.executable, "-m", "scdrugmap.cli"]


@pytest.fixture
def real_store(tmp_path):
    return ingest_pc9_and_gbm(Cli(), tmp_path / "st")


def _check_outcome(results, st):
    """Every process ended with 0 or a one-line refusal; the store holds one complete extraction."""
    for r in results:
        assert "Traceback" not in r.stderr and "FileNotFoundError" not in r.stderr, r.stderr
        if r.returncode:
            err = r.stderr.strip()
            assert r.returncode == 2 and err.startswith("Error: ") and "\n" not in err, err
            assert "another 'scdrugmap extract --backbone slow-hvg' is running" in err
    assert any(r.returncode == 0 for r in results)
    store = Store.open(st)
    assert sorted(store.provenance("slow-hvg")["dataset"]) == ["gbm", "pc9"]
    assert not list((st / "embeddings.zarr" / arrays.STAGING).glob("*")) and not list(st.glob(".lock-*"))
    X, cells = store.load("slow-hvg", dtype=np.float32)
    assert X.shape == (6505, 978) and np.isfinite(X).all() and (X != 0).any(axis=1).mean() > 0.99
    verified = subprocess.run([*CLI, "store", "verify", str(st)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    return X


@pytest.mark.parametrize("force", [False, True], ids=["first-extraction", "both-force"])
def test_two_extracts_started_together(real_store, tmp_path, force):
    """Both processes start at once (each chunk takes 0.1 s, so their work overlaps): one extracts,
    the other is refused with one line; with --force on an extracted store the same."""
    st = real_store
    cmd = [*CLI, "extract", "--store", str(st), "--backbone", "slow-hvg", "--chunk-rows", "500", "--quiet"]
    if force:
        subprocess.run(cmd, env=slow_env(tmp_path), check=True, capture_output=True)
        cmd.append("--force")
    procs = [subprocess.Popen(cmd, env=slow_env(tmp_path, seconds=0.1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    X = _check_outcome(results, st)
    # the survivor's embeddings are those of an uncontested extraction (hvg computes the same features)
    Cli().ok("extract", "--store", st, "--backbone", "hvg", "--quiet")
    reference, _ = Store.open(st).load("hvg", dtype=np.float32)
    assert np.array_equal(X, reference)


def test_a_refused_extract_leaves_the_store_as_it_was(real_store, tmp_path):
    """While one extraction is held mid-dataset, a second one is refused and changes no byte."""
    st = real_store
    cmd = [*CLI, "extract", "--store", str(st), "--backbone", "slow-hvg", "--chunk-rows", "500", "--quiet"]
    first = subprocess.Popen(cmd, env=slow_env(tmp_path, hold_after=3), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "holding").exists(), first, "the first extraction's fourth chunk")
    before = snapshot(st)
    second = subprocess.run(cmd, env=slow_env(tmp_path), capture_output=True, text=True)
    assert snapshot(st) == before
    (tmp_path / "go").touch()
    out, err = first.communicate(timeout=600)
    _check_outcome([subprocess.CompletedProcess(first.args, first.returncode, out, err), second], st)
    assert second.returncode == 2 and first.returncode == 0


def test_staging_of_two_pairs_never_collides(store_copy):
    """('pca__v2', 'SimData1') and ('pca', 'v2__SimData1') once had staging names with one prefix:
    creating the second discarded the first (a concurrent extraction then died on a missing file),
    and cleaning up backbone 'pca' looked into 'pca__v2''s staging."""
    st = store_copy()
    store = Store.open(st)
    root = store.embeddings_path
    job = {"params": {"n": 1}}
    first = arrays.StagedArray(root, "pca__v2", "SimData1", 80, 4, "float16", 40, job)
    first.write_chunk(0, np.ones((40, 4), np.float32))
    second = arrays.StagedArray(root, "pca", "v2__SimData1", 80, 4, "float16", 40, job)
    second.write_chunk(1, np.ones((40, 4), np.float32))
    assert first.dir != second.dir and first.dir.is_dir() and first.done_chunks() == {0}
    assert second.done_chunks() == {1}
    assert _staging_dirs(store, "pca") == [second.dir] and _staging_dirs(store, "pca__v2") == [first.dir]
    reclaim(store, "pca")
    assert first.dir.is_dir() and second.dir.is_dir()
    pairs = {(x["backbone"], x["dataset"]) for x in reclaimable(store)["interrupted_extractions"]}
    assert pairs == {("pca__v2", "SimData1"), ("pca", "v2__SimData1")}
    # the first one still finishes
    first.write_chunk(1, np.full((40, 4), 2, np.float32))
    rel = first.finish()
    assert (root / rel / "zarr.json").is_file()


def test_staging_named_by_an_older_version_is_owned_by_its_job(store_copy):
    """An interrupted extraction of an older version (<backbone>__<dataset>__<key>) belongs to the
    pair its job.json names: replaced when that pair is extracted again, left alone otherwise."""
    st = store_copy()
    store = Store.open(st)
    staging = store.embeddings_path / arrays.STAGING
    old_mine, old_other = staging / "pca__SimData1__0123456789abcdef", staging / "pca__v2__SimData1__fedcba9876543210"
    for path, backbone in ((old_mine, "pca"), (old_other, "pca__v2")):
        (path / "done").mkdir(parents=True)
        (path / "job.json").write_text(json.dumps({"backbone": backbone, "dataset": "SimData1", "n_rows": 80,
                                                   "chunk_rows": 40}))
    assert _staging_dirs(store, "pca") == [old_mine] and _staging_dirs(store, "pca__v2") == [old_other]
    fresh = arrays.StagedArray(store.embeddings_path, "pca", "SimData1", 80, 4, "float16", 40, {"params": {}})
    assert not old_mine.exists() and old_other.is_dir() and fresh.dir.is_dir()
