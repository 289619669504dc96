"""Pack / verify / unpack: round trips, one changed byte in any file, missing and extra files,
--strip-paths, and bad input leaving everything as it was."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot
from scdrugmap.probe.run import run_probe
from scdrugmap.store import pack as P
from scdrugmap.store.schema import SCHEMA_VERSION
from scdrugmap.store.store import Store

KINDS = {"dir": "pack", "tar": "st.tar", "tar.zst": "st.tar.zst"}


def flip(path: Path, offset: int) -> bytes:
    data = bytearray(path.read_bytes())
    before = bytes(data)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return before


def cohort(store) -> pd.DataFrame:
    return Store.open(store).sql('SELECT * FROM cohort ORDER BY dataset, "row"')


def probe_scores(store) -> pd.DataFrame:
    run = run_probe(Store.open(store), "pca", head="lr", protocol="cross", seed=3, show_progress=False)
    return run.results.drop(columns=["fit_seconds"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_pack_unpack_round_trip_gives_identical_query_and_probe_results(cli, small_store, store_copy, tmp_path,
                                                                       kind):
    before = snapshot(small_store)
    out = tmp_path / KINDS[kind]
    msg = cli.ok("store", "pack", small_store, out).output
    assert f"({kind})" in msg and "files" in msg
    assert snapshot(small_store) == before                 # packing changes nothing
    assert "all match the manifest" in cli.ok("store", "verify", out).output
    dest = tmp_path / "received"
    cli.ok("store", "unpack", out, dest)
    assert "all match the manifest" in cli.ok("store", "verify", dest).output

    pd.testing.assert_frame_equal(cohort(dest), cohort(small_store))
    for table in ("datasets", "provenance", "probe_results"):
        pd.testing.assert_frame_equal(Store.open(dest).sql(f"SELECT * FROM {table} ORDER BY ALL"),
                                      Store.open(small_store).sql(f"SELECT * FROM {table} ORDER BY ALL"))
    X0, _ = Store.open(small_store).load("pca")
    X1, _ = Store.open(dest).load("pca")
    np.testing.assert_array_equal(X0, X1)
    if kind == "tar":                 # the probe on the copy scores exactly as on the original
        pd.testing.assert_frame_equal(probe_scores(dest), probe_scores(store_copy()))
    # a directory pack is itself a store
    if kind == "dir":
        pd.testing.assert_frame_equal(cohort(out), cohort(small_store))


def test_manifest_records_versions_provenance_and_a_sha256_per_file(small_store, tmp_path):
    r = P.pack(small_store, tmp_path / "pack")
    m = json.loads((tmp_path / "pack" / P.MANIFEST).read_text())
    assert m["format"] == P.FORMAT and m["schema_version"] == SCHEMA_VERSION
    assert m["scdrugmap_version"] and m["paths_stripped"] is False
    assert {d["dataset"] for d in m["datasets"]} == set(Store.open(small_store).dataset_names())
    assert len(m["provenance"]) == 10 and m["provenance"][0]["params"]["space_id"].startswith("pca:")
    assert m["probe_runs"] == 1
    for rel, entry in m["files"].items():
        data = (tmp_path / "pack" / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert r.n_files == len(m["files"]) and any(rel.startswith("models/pca/") for rel in m["files"])
    # the manifest names every file of the store but nothing in progress
    assert not any("_staging" in rel for rel in m["files"])


def test_pack_leaves_out_extractions_in_progress_and_orphans(store_copy, tmp_path):
    st = store_copy()
    (st / "embeddings.zarr" / "_staging" / "pca__x__1").mkdir(parents=True)
    (st / "embeddings.zarr" / "_staging" / "pca__x__1" / "job.json").write_text("{}")
    (st / "embeddings.zarr" / "pca" / "orphan" / "abc").mkdir(parents=True)
    (st / "embeddings.zarr" / "pca" / "orphan" / "abc" / "zarr.json").write_text("{}")
    files = P.pack(st, tmp_path / "p.tar").manifest["files"]
    assert not any("_staging" in rel or "orphan" in rel for rel in files)


def test_verify_detects_one_changed_byte_in_any_file_of_a_directory_pack(small_store, tmp_path):
    out = tmp_path / "pack"
    P.pack(small_store, out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) > 30
    for path in files:
        rel = path.relative_to(out).as_posix()
        for offset in sorted({0, path.stat().st_size // 2, path.stat().st_size - 1}):
            original = flip(path, offset)
            report_or_error = _verify(out)
            path.write_bytes(original)
            assert rel in report_or_error, (rel, offset, report_or_error)
    assert P.verify(out).ok


def _verify(path) -> str:
    from scdrugmap.errors import UserError

    try:
        r = P.verify(path)
    except UserError as e:                  # a damaged manifest.json is an error of its own
        return str(e)
    assert not r.ok
    return r.summary()


def test_verify_names_missing_extra_and_resized_files(cli, small_store, tmp_path):
    out = tmp_path / "pack"
    P.pack(small_store, out)
    chunk = next(p for p in sorted(out.rglob("c/*/*")) if p.is_file())
    rel = chunk.relative_to(out).as_posix()
    chunk.rename(tmp_path / "moved")
    (out / "notes.txt").write_text("hello")
    with open(out / "index.duckdb", "ab") as f:
        f.write(b"\0")
    err = cli.fails("store", "verify", out, match="failed verification")
    assert f"{rel}: missing" in err and "notes.txt: extra file" in err and "index.duckdb:" in err
    assert "3 problems" in err


@pytest.mark.parametrize("kind", ["tar", "tar.zst"])
def test_verify_detects_changed_bytes_in_archives(small_store, tmp_path, kind):
    out = tmp_path / KINDS[kind]
    P.pack(small_store, out)
    size = out.stat().st_size
    if kind == "tar":
        with tarfile.open(out) as tar:
            members = tar.getmembers()
        # one byte in the data of every member, and in the header of some
        spots = [(m.name, m.offset_data + m.size // 2) for m in members if m.size]
        spots += [(m.name, m.offset + 10) for m in members[::7]]
    else:
        spots = [(None, o) for o in np.linspace(0, size - 1, 25).astype(int)]
    for name, offset in spots:
        original = flip(out, int(offset))
        found = _verify(out)
        out.write_bytes(original)
        if name is not None and name != P.MANIFEST:
            assert name in found or "missing" in found, (name, found)
    assert P.verify(out).ok
    # a truncated archive
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    assert "missing" in _verify(out) or "truncated" in _verify(out)


def test_unpack_refuses_a_damaged_pack_and_writes_nothing(cli, small_store, tmp_path):
    out = tmp_path / "st.tar"
    P.pack(small_store, out)
    with tarfile.open(out) as tar:
        member = next(m for m in tar.getmembers() if "/c/" in m.name)
    flip(out, member.offset_data + 3)
    before = set(tmp_path.iterdir())
    err = cli.fails("store", "unpack", out, tmp_path / "new" / "dest", match="failed verification")
    assert member.name in err and "nothing was unpacked" in err
    assert set(tmp_path.iterdir()) == before          # no destination, no parent, no staging directory left


def test_unpack_refuses_a_pack_of_a_newer_schema(cli, small_store, tmp_path):
    out = tmp_path / "pack"
    P.pack(small_store, out)
    m = json.loads((out / P.MANIFEST).read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (out / P.MANIFEST).write_bytes(P.encode_manifest(m))
    # as an archive too: the manifest is the first member, checked before anything is written
    tar_path = tmp_path / "newer.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(out / P.MANIFEST, arcname=P.MANIFEST)
        for rel in sorted(m["files"]):
            tar.add(out / rel, arcname=rel)
    for src in (out, tar_path):
        err = cli.fails("store", "unpack", src, tmp_path / "dest", match="newer")
        assert f"schema version {SCHEMA_VERSION + 1}" in err and f"version {SCHEMA_VERSION}" in err
        assert not (tmp_path / "dest").exists()


def test_strip_paths_leaves_no_trace_of_local_paths(cli, small_store, tmp_path):
    before = snapshot(small_store)
    data_dir = str(small_store.parent / "data")
    assert data_dir.encode() in (small_store / "index.duckdb").read_bytes()
    out = tmp_path / "st.tar"
    cli.ok("store", "pack", small_store, out, "--strip-paths")
    dest = tmp_path / "received"
    cli.ok("store", "unpack", out, dest)
    assert snapshot(small_store) == before
    assert data_dir.encode() not in (dest / "index.duckdb").read_bytes()
    assert data_dir not in (dest / P.MANIFEST).read_text()
    paths = Store.open(dest).sql("SELECT dataset, source_path FROM datasets ORDER BY 1")
    assert list(paths["source_path"]) == [f"{d}.h5ad" for d in paths["dataset"]]
    assert json.loads((dest / P.MANIFEST).read_text())["paths_stripped"] is True
    pd.testing.assert_frame_equal(cohort(dest), cohort(small_store))


def test_strip_json_reduces_absolute_paths_to_file_names():
    text = json.dumps({"panel": "/home/me/panels/mine.tsv", "win": "C:\\data\\x.h5ad", "n": 3,
                       "nested": [{"p": "~/ckpt/model.bin"}], "formula": "log1p(counts / total)"})
    out = json.loads(P._strip_json(text))
    assert out == {"panel": "mine.tsv", "win": "x.h5ad", "n": 3, "nested": [{"p": "model.bin"}],
                   "formula": "log1p(counts / total)"}


@pytest.mark.parametrize("args, match", [
    (["store", "pack", "{tmp}/nothing", "{tmp}/out.tar"], "does not exist"),
    (["store", "pack", "{store}", "{tmp}/out.zip"], "unsupported archive type"),
    (["store", "pack", "{store}", "{store}/inside.tar"], "inside the store"),
    (["store", "pack", "{store}", "{tmp}/exists.tar"], "exists"),
    (["store", "pack", "s3://bucket/st", "{tmp}/x.tar"], "URL"),
    (["store", "verify", "{tmp}/nothing.tar"], "does not exist"),
    (["store", "verify", "{tmp}/full"], "holds no pack manifest"),     # neither a store nor a pack
    (["store", "verify", "{store}", "--expect", "{sha}"], "is a store, not a pack"),
    (["store", "verify", "{tmp}/good.tar", "--expect", "12ab"], "not a sha256 digest"),
    (["store", "verify", "{tmp}/exists.tar"], "not a readable tar archive"),
    (["store", "unpack", "{tmp}/exists.tar", "{tmp}/dest"], "not a readable tar archive"),
    (["store", "unpack", "{tmp}/good.tar", "{tmp}/full"], "not empty"),
    (["store", "verify", "https://host/st.tar"], "URL"),
    (["store", "unpack", "{tmp}/good.tar", "s3://bucket/st"], "URL"),
    (["store", "pack", "{store}", "s3://bucket/st.tar"], "URL"),
])
def test_bad_input_is_one_line_and_writes_nothing(cli, small_store, tmp_path, args, match):
    P.pack(small_store, tmp_path / "good.tar")
    (tmp_path / "exists.tar").write_bytes(b"not a tar at all" * 100)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    before_store, before_tmp = snapshot(small_store), snapshot(tmp_path)
    cli.fails(*[a.format(tmp=tmp_path, store=small_store, sha="0" * 64) for a in args], match=match)
    assert snapshot(small_store) == before_store and snapshot(tmp_path) == before_tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.tar", "full", "good.tar"]


def test_store_info_on_a_store_and_on_a_pack(cli, small_store, tmp_path):
    out = cli.ok("store", "info", small_store).output
    assert f"schema version {SCHEMA_VERSION}" in out and "10 datasets, 800 cells" in out and "pca" in out
    data = json.loads(cli.ok("store", "info", small_store, "--json").output)
    assert data["cells"] == 800 and data["backbones"][0]["dim"] == "50"
    assert data["backbones"][0]["origin"] == "extracted" and data["backbones"][0]["bytes"] > 0
    assert data["bytes"]["total"] > data["bytes"]["index"] > 0
    P.pack(small_store, tmp_path / "st.tar.zst")
    out = cli.ok("store", "info", tmp_path / "st.tar.zst").output
    assert "pack" in out and "tar.zst" in out and "800 cells" in out


def test_pack_folds_a_leftover_write_ahead_log_into_the_pack_not_into_the_store(cli, store_copy, tmp_path):
    """A writer whose final checkpoint never happened (a full disk, a kill) leaves index.duckdb.wal;
    the pack holds its changes, and the store's own files stay byte for byte as they were."""
    import subprocess
    import sys

    st = store_copy()
    code = ("import duckdb, os, sys; con = duckdb.connect(sys.argv[1]); "
            "con.execute(\"INSERT INTO meta VALUES ('wal_probe', 'kept')\"); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(st / "index.duckdb")], check=True)
    assert (st / "index.duckdb.wal").exists()
    before = snapshot(st)
    cli.ok("store", "pack", st, tmp_path / "st.tar")
    assert snapshot(st) == before
    cli.ok("store", "unpack", tmp_path / "st.tar", tmp_path / "got")
    assert not (tmp_path / "got" / "index.duckdb.wal").exists()
    meta = Store.open(tmp_path / "got").sql("SELECT value FROM meta WHERE key = 'wal_probe'")
    assert meta["value"].tolist() == ["kept"]
