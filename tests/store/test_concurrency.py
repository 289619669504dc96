"""Several real scdrugmap processes on one store: nothing lost, nothing half-written, no traceback.

Every wait here is on an event of the processes under test (a file appearing, a line printed),
never on a clock; the limits in ``wait_for`` only stop a hung test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import GBM, need_shared, slow_env, wait_for
from scdrugmap.store import arrays
from scdrugmap.store.store import Store

CLI = [sys.executable, "-m", "scdrugmap.cli"]


def one_line_error(result) -> str:
    err = result.stderr.strip() if isinstance(result.stderr, str) else result.stderr.decode().strip()
    assert result.returncode == 2, (result.returncode, err)
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_second_extract_of_a_backbone_is_refused_at_once(small_store, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(small_store, st)
    cmd = [*CLI, "extract", "--store", str(st), "--backbone", "slow-hvg", "--chunk-rows", "20", "--quiet"]
    first = subprocess.Popen(cmd, env=slow_env(tmp_path, hold_after=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: (tmp_path / "holding").exists(), first, "the first extraction's third chunk")
    second = subprocess.run(cmd, env=slow_env(tmp_path), capture_output=True, text=True)
    err = one_line_error(second)
    assert "another 'scdrugmap extract --backbone slow-hvg' is running" in err
    (tmp_path / "go").touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    store = Store.open(st)
    assert len(store.provenance("slow-hvg")) == 10
    assert not list((st / "embeddings.zarr" / arrays.STAGING).glob("*")) and not list(st.glob(".lock-*"))
    X, _ = store.load("slow-hvg")
    assert X.shape == (800, 978)


def test_other_backbones_extract_side_by_side(small_store, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(small_store, st)
    slow = subprocess.Popen([*CLI, "extract", "--store", str(st), "--backbone", "slow-hvg", "--quiet"],
                            env=slow_env(tmp_path, hold_after=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: (tmp_path / "holding").exists(), slow, "the slow extraction's second chunk")
    other = subprocess.run([*CLI, "extract", "--store", str(st), "--backbone", "hvg", "--quiet"], capture_output=True,
                           text=True)
    assert other.returncode == 0, other.stderr
    (tmp_path / "go").touch()
    assert slow.wait(timeout=600) == 0, slow.communicate()
    assert {"hvg", "slow-hvg", "pca"} <= set(Store.open(st).extracted_backbones())


def test_four_concurrent_probes_all_store_their_runs(small_store, tmp_path):
    st = tmp_path / "st"
    shutil.copytree(small_store, st)
    before = len(Store.open(st).sql("SELECT * FROM probe_runs"))
    procs = [subprocess.Popen([*CLI, "probe", "--store", str(st), "--backbone", "pca", "--head", head, "--seed",
                               str(seed), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for head, seed in (("lr", 1), ("lr", 2), ("lgbm", 1), ("mlp", 1))]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    runs = Store.open(st).sql("SELECT * FROM probe_runs")
    assert len(runs) == before + 4


HOLDER = textwrap.dedent("""
    import sys, duckdb
    con = duckdb.connect(sys.argv[1])            # a read-write connection: DuckDB's exclusive lock
    con.execute("SELECT 1")
    print("holding", flush=True)
    sys.stdin.readline()
    con.close()
""")


def _held_store(small_store, tmp_path):
    """A copy of the store whose index another process holds for writing, and that process
    (it lets go when a line is written to it)."""
    st = tmp_path / "st"
    shutil.copytree(small_store, st)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(st / "index.duckdb")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return st, holder


def test_a_reader_waits_for_a_writer_then_reads(small_store, tmp_path):
    st, holder = _held_store(small_store, tmp_path)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        reader = subprocess.Popen([*CLI, "query", "--store", str(st), "SELECT count(*) AS n FROM cells"],
                                  stdout=subprocess.PIPE, stderr=err, text=True)
        wait_for(lambda: "waiting for process" in log.read_text(), reader, "the reader's waiting message")
        holder.communicate("\n", timeout=60)
        out, _ = reader.communicate(timeout=600)
    assert reader.returncode == 0 and "800" in out
    assert f"waiting for process {holder.pid} to finish with the index of {st}" in log.read_text()


def test_a_writer_gives_up_after_the_lock_timeout_with_one_line(small_store, tmp_path):
    st, holder = _held_store(small_store, tmp_path)
    env = {**slow_env(tmp_path), "SCDRUGMAP_LOCK_TIMEOUT": "0.2"}
    result = subprocess.run([*CLI, "probe", "--store", str(st), "--backbone", "pca", "--quiet"], capture_output=True,
                            text=True, env=env)
    holder.communicate("\n", timeout=60)
    err = one_line_error(result)
    assert f"held by process {holder.pid}" in err and "SCDRUGMAP_LOCK_TIMEOUT" in err


def test_concurrent_first_ingests_make_one_store_with_both(tmp_path):
    gbm = need_shared(GBM)
    st = tmp_path / "new" / "st"
    procs = [subprocess.Popen([*CLI, "ingest", str(gbm), "--store", str(st), "--dataset", name, "--label-col",
                               "condition", "--sensitive", "ctrl", "--resistant", "panobinostat", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b", "c")]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert Store.open(st).dataset_names() == ["a", "b", "c"]
    assert sorted(p.name for p in st.parent.iterdir()) == ["st"]          # no work folder left


def test_concurrent_ingests_of_one_name_one_wins(small_store, tmp_path):
    gbm = need_shared(GBM)
    st = tmp_path / "st"
    shutil.copytree(small_store, st)
    procs = [subprocess.Popen([*CLI, "ingest", str(gbm), "--store", str(st), "--dataset", "gbm", "--label-col",
                               "condition", "--sensitive", "ctrl", "--resistant", "panobinostat", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]
    assert sorted(r.returncode for r in results) == [0, 2, 2]
    for r in results:
        if r.returncode:
            assert "already in the store" in one_line_error(r)
    assert Store.open(st).dataset_names().count("gbm") == 1


def test_a_read_survives_a_concurrent_re_extraction(store_copy, monkeypatch):
    """extract --force replaces (and deletes) the array a reader has open: the reader reads the new one."""
    from scdrugmap.extract.runner import extract

    st = store_copy()
    store = Store.open(st)
    expected, _ = store.load("pca", where="dataset = 'SimData1'")
    real = arrays.read_rows_many
    calls = []

    def replaced_meanwhile(jobs):
        if not calls:                           # the arrays are open; now another process replaces them
            calls.append(jobs[0][3])
            extract(Store.open(st), "pca", datasets=["SimData1"], force=True, chunk_rows=40, show_progress=False)
        return real(jobs)

    monkeypatch.setattr(arrays, "read_rows_many", replaced_meanwhile)
    X, _ = store.load("pca", where="dataset = 'SimData1'")
    assert calls and not (st / "embeddings.zarr" / calls[0]).exists()      # the array it opened is gone
    np.testing.assert_array_equal(X, expected)


@pytest.mark.parametrize("kind", ["ingest", "store pack", "store unpack", "store merge"])
def test_killed_commands_leave_nothing_the_next_run_does_not_clean(small_store, tmp_path, kind):
    """SIGKILL a real command while its work folder exists; the destination is absent, and the
    next run of the same command succeeds and removes the folder."""
    from scdrugmap.store.pack import pack

    gbm = need_shared(GBM)
    src = tmp_path / "src"
    shutil.copytree(small_store, src)
    pack(src, tmp_path / "p.tar")
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    args = {"ingest": ["ingest", str(gbm), "--store", str(dest), "--dataset", "gbm", "--label-col", "condition",
                       "--sensitive", "ctrl", "--resistant", "panobinostat", "--quiet"],
            "store pack": ["store", "pack", str(src), str(dest)],
            "store unpack": ["store", "unpack", str(tmp_path / "p.tar"), str(dest)],
            "store merge": ["store", "merge", str(src), str(small_store), "--into", str(dest)]}[kind]
    killed = False
    for _ in range(20):                       # until the kill lands while the work folder exists
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while proc.poll() is None and not list(dest.parent.glob(".dest.*-*[!k]")):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            killed = True
            break
        proc.communicate()
        shutil.rmtree(dest, ignore_errors=True)
    assert killed, "the command always finished before it could be killed"
    assert not dest.exists() and list(dest.parent.glob(".dest.*-*"))
    result = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if kind == "store merge" and result.returncode:                          # both inputs hold the same data
        pytest.fail(result.stderr)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]
    Store.open(dest)
