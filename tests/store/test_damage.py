"""Damaged stores: a flipped byte in a chunk, a missing chunk or array, a damaged zarr.json or
index.duckdb is a one-line error naming what is damaged, never a silent wrong value; and
'store verify DIR' finds it on a store that was never packed (a zarr.json edit that changes
nothing a reader uses, such as a key's case, has no checksum to catch it outside a pack)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import snapshot
from scdrugmap.store import arrays
from scdrugmap.store import pack as P
from scdrugmap.store.check import verify_store
from scdrugmap.store.store import Store


def _array(st, dataset="SimData1"):
    rel = Store.open(st).provenance("pca").set_index("dataset").loc[dataset, "array_path"]
    return rel, st / "embeddings.zarr" / rel


def flip(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_new_arrays_carry_checksums_and_every_chunk(small_store):
    rel, root = _array(small_store)
    meta = json.loads((root / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert sorted(p.name for p in (root / "c").iterdir()) == ["0", "1"]        # 80 cells, chunks of 40
    assert arrays.is_checked(Store.open(small_store).open_array(rel))


def test_all_zero_chunks_are_written(tmp_path):
    a = arrays.create_array(tmp_path / "a", (8, 3), (4, 3), "float16")
    a[:] = np.zeros((8, 3))
    assert sorted(p.name for p in (tmp_path / "a" / "c").iterdir()) == ["0", "1"]


@pytest.mark.parametrize("command", [
    ["probe", "--store", "{st}", "--backbone", "pca", "--quiet"],
    ["export", "--store", "{st}", "--backbone", "pca", "--to", "{tmp}/out.parquet"],
    ["export", "--store", "{st}", "--backbone", "pca", "--where", "dataset = 'SimData1'", "--to", "{tmp}/o.h5ad"],
])
def test_flipped_byte_in_a_chunk_is_named(cli, store_copy, tmp_path, command):
    st = store_copy()
    rel, root = _array(st)
    flip(root / "c" / "1" / "0")
    before = snapshot(st)
    err = cli.fails(*[a.format(st=st, tmp=tmp_path) for a in command], match="damaged")
    assert f"embedding array {rel}: chunk 1 (rows 40-79)" in err and "CRC-32C" in err
    assert snapshot(st) == before and not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob("o.h5ad"))


def test_a_read_that_skips_the_damaged_chunk_still_works(store_copy):
    st = store_copy()
    _, root = _array(st)
    flip(root / "c" / "1" / "0")
    X, cells = Store.open(st).load("pca", where="dataset = 'SimData1' AND \"row\" < 40")
    assert X.shape == (40, 50) and np.isfinite(X).all()


def test_missing_chunk_is_an_error_not_zeros(cli, store_copy):
    st = store_copy()
    rel, root = _array(st)
    (root / "c" / "0" / "0").unlink()
    err = cli.fails("probe", "--store", st, "--backbone", "pca", "--quiet", match="missing")
    assert f"embedding array {rel}: chunk 0 (rows 0-39) is missing" in err


def test_damaged_metadata_and_missing_array(cli, store_copy):
    import shutil

    st = store_copy()
    rel, root = _array(st)
    (root / "zarr.json").write_text("{ not json")
    cli.fails("probe", "--store", st, "--backbone", "pca", "--quiet", match=f"embedding array {rel} is damaged")

    st2 = store_copy("b")
    _, root2 = _array(st2)
    meta = json.loads((root2 / "zarr.json").read_text())
    meta["shape"][0] = 79                                              # valid metadata, wrong shape
    (root2 / "zarr.json").write_text(json.dumps(meta))
    cli.fails("probe", "--store", st2, "--backbone", "pca", "--quiet", match="where the index says")

    shutil.rmtree(root)
    cli.fails("probe", "--store", st, "--backbone", "pca", "--quiet", match=f"embedding array {rel} of backbone")


@pytest.mark.parametrize("rows", [41, 48, 60, 39])
def test_a_wrong_chunk_height_in_zarr_json_is_named_not_read(cli, store_copy, tmp_path, rows):
    """One bit can turn "chunk_shape": [40, 50] into [48, 50] and leave valid metadata: export and
    probe must name the array, never return rows decoded with the wrong height."""
    st = store_copy()
    rel, root = _array(st, "SimData9")
    meta = json.loads((root / "zarr.json").read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = rows
    (root / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(st)
    for args in (("export", "--store", st, "--backbone", "pca", "--where", "dataset = 'SimData9'", "--to",
                  tmp_path / "x.parquet"), ("probe", "--store", st, "--backbone", "pca", "--quiet")):
        cli.fails(*args, match=f"embedding array {rel}")
    assert not (tmp_path / "x.parquet").exists() and snapshot(st) == before
    # the reader alone (no index to compare with) refuses chunks that decode to another size
    from zarr.storage import LocalStore

    array = arrays.open_counted(LocalStore(str(st / "embeddings.zarr")), arrays.IOStats(), rel)
    with pytest.raises(arrays.ChunkError, match="zarr.json makes a chunk"):
        arrays.read_rows(array, np.arange(array.shape[0]), rel=rel)


@pytest.mark.parametrize("offset", [0, 4096, 8192, 12300, -5000])
def test_damaged_index_is_one_line(cli, store_copy, offset):
    st = store_copy()
    index = st / "index.duckdb"
    size = index.stat().st_size
    flip(index, offset % size)
    # a flip in a free block can be harmless; what is read must be caught or correct
    result = cli("query", "--store", st, "SELECT count(*) AS n FROM cells")
    if result.exit_code == 0:
        assert "800" in result.output
        return
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("Error: ") and "\n" not in err, result.output
    assert ("damaged" in err or "not a scdrugmap store" in err) and "Traceback" not in result.output
    for command in (["store", "info", st], ["probe", "--store", st, "--backbone", "pca", "--quiet"]):
        cli.fails(*command, match="")


def test_index_that_is_not_duckdb_is_named(cli, store_copy):
    st = store_copy()
    (st / "index.duckdb").write_bytes(b"hello world" * 1000)
    err = cli.fails("query", "--store", st, "SELECT 1", match="damaged")
    assert "not a valid DuckDB database file" in err and "store verify" in err


# ---- store verify on a store that was never packed -------------------------------------
def test_verify_a_working_store(cli, small_store):
    out = cli.ok("store", "verify", small_store).output
    assert "every checksum matches" in out and "32 files" in out     # index, 10 x (zarr.json + 2 chunks), pca fit


def test_verify_finds_each_kind_of_damage(cli, store_copy):
    st = store_copy()
    rel1, root1 = _array(st, "SimData1")
    rel2, root2 = _array(st, "SimData2")
    flip(root1 / "c" / "0" / "0")
    (root2 / "c" / "1" / "0").unlink()
    [fit] = (st / "models" / "pca").glob("*.npz")
    flip(fit, 200)
    before = snapshot(st)
    report = verify_store(st)
    assert not report.ok and len(report.problems) == 3, report.problems
    joined = " | ".join(report.problems)
    assert f"{rel1}: chunk 0 (rows 0-39) is damaged" in joined and f"{rel2}: chunk 1 (rows 40-79) is missing" in joined
    assert f"models/pca/{fit.name}: damaged" in joined
    err = cli.fails("store", "verify", st, match="failed verification")
    assert "3 problems" in err
    assert snapshot(st) == before                                    # verify writes nothing


def test_verify_a_store_with_a_damaged_index(cli, store_copy):
    st = store_copy()
    index = st / "index.duckdb"
    data = bytearray(index.read_bytes())
    for offset in range(0, len(data), 4096):                         # every block damaged
        data[offset + 100] ^= 1
    index.write_bytes(bytes(data))
    err = cli.fails("store", "verify", st, match="failed verification")
    assert "index.duckdb" in err and "damaged" in err


def test_verify_notes_arrays_without_checksums(cli, store_copy):
    """Arrays written before checksums existed: still readable, reported as decode-only."""
    import zarr

    st = store_copy()
    rel, root = _array(st)
    values = zarr.open_array(str(root), mode="r")[:]
    import shutil

    shutil.rmtree(root)
    old = zarr.create_array(store=str(root), shape=values.shape, chunks=(40, 50), dtype=values.dtype,
                            compressors=arrays._compressors()[:1], fill_value=0, zarr_format=3)
    old[:] = values
    X, _ = Store.open(st).load("pca", where="dataset = 'SimData1'")
    np.testing.assert_array_equal(X, values)
    result = cli.ok("store", "verify", st)
    assert "without chunk checksums" in result.stderr and "pca x SimData1" in result.stderr


# ---- verify --expect: damage and tampering -------------------------------------------------
def test_expect_catches_a_rewritten_manifest(cli, small_store, tmp_path):
    out = cli.ok("store", "pack", small_store, tmp_path / "p").output
    digest = out.split("manifest sha256: ")[1].split()[0]
    assert len(digest) == 64
    assert "the manifest is the one published" in cli.ok("store", "verify", tmp_path / "p", "--expect", digest).output
    # tampering: an extra file, listed in a rewritten (self-consistent) manifest
    (tmp_path / "p" / "models" / "extra.npz").write_bytes(b"payload")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    manifest["files"]["models/extra.npz"] = {"size": 7, "sha256": __import__("hashlib").sha256(b"payload").hexdigest()}
    (tmp_path / "p" / "manifest.json").write_bytes(P.encode_manifest(manifest))
    assert P.verify(tmp_path / "p").ok                                # damage-only check: passes
    err = cli.fails("store", "verify", tmp_path / "p", "--expect", digest, match="not the pack that was published")
    assert digest in err
