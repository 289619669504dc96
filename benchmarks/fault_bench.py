"""Fault injection: what a careless colleague, a crash or a bad disk does to a store.

Real ``scdrugmap`` CLI processes run against copies of a small simulated store (10 datasets x
80 cells, pca, one probe run) while the script kills them (SIGKILL at different moments),
flips bytes in the store, fills or write-protects its disk, runs commands side by side, and
feeds them hostile SQL. Each trial is tallied as

* survived: every command judged ended well for a user: exit 0, or exit 2 with exactly one
  stderr line starting ``Error: `` and no traceback; plus the outcome the kind promises
  (e.g. a damaged chunk is refused, never read);
* identical: the store is byte for byte as before, or, for a killed writing command, a rerun
  of the same command completes and gives the result of an uninterrupted run (each kind prints
  the criterion it uses).

The unit tests check one case of each kind; this reruns them at many moments and offsets, to
find the windows a single test misses. A store built in a temporary folder, removed at the end.

Run: ``python benchmarks/fault_bench.py [--quick] [--seed N]`` (about 3 minutes on 2 cores; --quick about 1).
Exit status 1 when any trial did not survive or was not identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# One BLAS/OpenMP thread here and in every command started (as tests/conftest.py does), set
# before numpy loads: the store built in this process and the commands' reruns then compute
# the same float16 values (pca differs by one unit in the last place between 1 and 2 threads),
# and LightGBM does not spin-wait for a busy core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT / "tests" / "store", ROOT / "tests", HERE):      # how the tests import their helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import machine  # noqa: E402

from conftest import GBM, build_small_store, slow_env, snapshot, wait_for  # noqa: E402

CLI = [sys.executable, "-m", "scdrugmap.cli"]
SECRET = "the secret of this machine"
CALL_LIMIT = 300            # seconds: only stops a hung command


# ---- running commands ------------------------------------------------------------------------
@dataclass
class Result:
    args: list
    rc: int
    stdout: str
    stderr: str

    @property
    def err(self) -> str:
        return self.stderr.strip()

    def survived(self) -> bool:
        """Exit 0, or exit 2 with exactly one stderr line 'Error: ...'; never a traceback."""
        if "Traceback" in self.stdout or "Traceback" in self.stderr:
            return False
        if self.rc == 0:
            return True
        lines = self.err.splitlines()
        return self.rc == 2 and len(lines) == 1 and lines[0].startswith("Error: ")

    def refused(self, match: str = "") -> bool:
        return self.rc == 2 and self.survived() and match.lower() in self.err.lower()

    def describe(self) -> str:
        cmd = " ".join(str(a) for a in self.args)
        tail = (self.err or self.stdout.strip())[-600:]
        return f"`scdrugmap {cmd}` -> exit {self.rc}: {tail}"


def env_for(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("SCDRUGMAP_STORE", None)
    env.update(extra or {})
    return env


def cli(*args, env=None, timeout=CALL_LIMIT) -> Result:
    args = [str(a) for a in args]
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, env=env or env_for(),
                       timeout=timeout)
    return Result(args, r.returncode, r.stdout, r.stderr)


def start(*args, env=None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A CLI process in its own process group (killed as a whole, like a crashed job)."""
    return subprocess.Popen([*CLI, *[str(a) for a in args]], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            cwd=ROOT, env=env or env_for(), start_new_session=True)


def finish(proc: subprocess.Popen, timeout=CALL_LIMIT) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.args[len(CLI):], proc.returncode, out or "", err or "")


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group; False when the process had already finished."""
    if proc.poll() is not None:
        proc.communicate()
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        return kill(proc)
    proc.communicate()
    return False


def held(proc: subprocess.Popen, gate: Path, hold_after: int) -> None:
    """Wait until the slow-hvg plugin holds ``proc`` after ``hold_after`` chunks (killed if it never does)."""
    try:
        wait_for(lambda: (gate / "holding").exists(), proc, f"chunk {hold_after + 1}", limit=CALL_LIMIT)
    except BaseException:
        kill(proc)
        raise


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ---- what a store holds -----------------------------------------------------------------------
def digest(obj) -> str:
    if hasattr(obj, "to_csv"):
        obj = obj.to_csv(index=False)
    if hasattr(obj, "tobytes"):
        obj = f"{obj.dtype}{obj.shape}".encode() + obj.tobytes()
    if isinstance(obj, str):
        obj = obj.encode()
    return hashlib.sha256(obj).hexdigest()[:16]


def embeddings(path: Path, backbone: str, datasets=None) -> dict:
    """Per dataset, the digest of its embedding rows (and their cells), as a reader loads them."""
    from scdrugmap.store.store import Store

    X, cells = Store.open(path).load(backbone, datasets=datasets)
    out = {}
    for name in sorted(set(cells["dataset"])):
        mask = (cells["dataset"] == name).to_numpy()
        out[name] = digest(X[mask]) + digest(cells.loc[mask, ["row", "obs_name", "label"]])
    return out


def contents(path: Path) -> dict:
    """Everything a store holds for its users, less what differs between two identical runs
    (timestamps, run ids, random array folder names, fitting seconds)."""
    from scdrugmap.store.store import Store

    store = Store.open(path)
    out = {
        "datasets": digest(store.sql("SELECT * EXCLUDE (ingested_at) FROM datasets ORDER BY dataset")),
        "cells": digest(store.sql('SELECT * FROM cells ORDER BY dataset, "row"')),
        "provenance": digest(store.sql("SELECT * EXCLUDE (created_at, array_path) FROM provenance "
                                       "ORDER BY backbone, dataset")),
        "probes": probe_signatures(path),
        "models": snapshot(Path(path) / "models"),
    }
    for backbone in store.extracted_backbones():
        out[f"embeddings:{backbone}"] = embeddings(path, backbone)
    return out


def probe_signatures(path: Path, where: str = "TRUE") -> list:
    """One digest per stored probe run (its settings and every split's metrics), sorted."""
    return sorted(probe_runs(path, where).values())


def probe_runs(path: Path, where: str = "TRUE") -> dict:
    """Run id -> digest of the run's settings and every split's metrics."""
    from scdrugmap.store.store import Store

    df = Store.open(path).sql(
        "SELECT r.run_id, r.* EXCLUDE (run_id, created_at), p.* EXCLUDE (run_id, fit_seconds) "
        f"FROM probe_runs r JOIN probe_results p USING (run_id) WHERE {where} ORDER BY r.run_id, p.split")
    return {run_id: digest(g.drop(columns="run_id")) for run_id, g in df.groupby("run_id")}


def pack_signature(path: Path) -> dict:
    from scdrugmap.store import pack as P

    manifest = P.read_manifest(path)
    return {k: v for k, v in manifest.items() if k not in ("created_at", "manifest_sha256")}


def leftovers(path: Path) -> list[str]:
    """What a killed command could leave in or beside a store that nothing would clean up."""
    from scdrugmap.store import arrays
    from scdrugmap.store.cleanup import reclaimable
    from scdrugmap.store.store import Store

    left = reclaimable(Store.open(path))
    found = [x["path"] for key in ("unreferenced_arrays", "interrupted_extractions", "stale_work_folders")
             for x in left[key]]
    found += [p.name for p in Path(path).glob(".lock-*")]
    found += [p.name for p in Path(path).glob("*.wal")]
    staging = Path(path) / "embeddings.zarr" / arrays.STAGING
    found += [f"{arrays.STAGING}/{p.name}" for p in staging.glob("*")] if staging.is_dir() else []
    return sorted(set(found))


# ---- trials and their tally ------------------------------------------------------------------
@dataclass
class Trial:
    name: str
    survived: bool = True
    identical: bool = True
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def judge(self, result: Result, expect: bool = True, why: str = "") -> Result:
        """Count ``result`` against survival: the generic one-line rule and ``expect``."""
        if not result.survived():
            self.survived = False
            self.problems.append(f"not survived: {result.describe()}")
        elif not expect:
            self.survived = False
            self.problems.append(f"{why or 'unexpected outcome'}: {result.describe()}")
        return result

    def same(self, ok: bool, what: str):
        if not ok:
            self.identical = False
            self.problems.append(f"not identical: {what}")


@dataclass
class Kind:
    key: str
    title: str
    survived_rule: str
    identical_rule: str
    trials: list = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    extra: list = field(default_factory=list)

    def add(self, fn, *args, **kwargs):
        """Run one trial function (a Trial or a list of them); one that breaks is a failed trial."""
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            how = ", ".join([*map(str, args[1:]), *(f"{k}={v}" for k, v in kwargs.items())])
            out = Trial(f"{fn.__name__}({how}) aborted: {type(e).__name__}", survived=False,
                        identical=False, problems=[traceback.format_exc(limit=4).strip()[-1500:]])
        self.trials.extend(out if isinstance(out, list) else [out])


class Bench:
    def __init__(self, work: Path, quick: bool, seed: int):
        self.work, self.quick, self.rng = work, quick, random.Random(seed)
        self.n = 0
        self._refs = {}

    def dir(self, label: str) -> Path:
        self.n += 1
        d = self.work / f"{self.n:03d}-{label}"
        d.mkdir()
        return d

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.base, dest)
        return dest

    def ref(self, key, make):
        if key not in self._refs:
            self._refs[key] = make()
        return self._refs[key]

    def spread(self, n: int, lo: float, hi: float) -> list[float]:
        """n moments spread over [lo, hi): one at random in each of n equal slices."""
        return [lo + (hi - lo) * (i + self.rng.random()) / n for i in range(n)]

    # -- setup ----------------------------------------------------------------------------------
    def setup(self):
        t = time.perf_counter()
        self.base = build_small_store(self.work / "small")
        self.data = self.work / "small" / "data"
        self.src = self.copy(self.work / "src")                  # read-only source of pack and merge
        self.src_snapshot = snapshot(self.src)
        if GBM.exists():
            self.ingest_args = [GBM, "--dataset", "gbm", "--label-col", "condition", "--sensitive", "ctrl",
                                "--resistant", "panobinostat", "--quiet"]
        else:                                                    # no shared data: a simulated source
            self.ingest_args = [self.data / "SimData1.h5ad", "--dataset", "sim", "--label-col", "response",
                                "--sample-col", "sample_id", "--patient-col", "patient_id", "--quiet"]
        self.pack_tar = self.work / "p.tar"
        r = cli("store", "pack", self.src, self.pack_tar)
        assert r.rc == 0, r.describe()
        return time.perf_counter() - t


# ---- 1. kills during extraction ------------------------------------------------------------------
EXTRACTIONS = {
    # name: (extract arguments, uses the slow-hvg plugin)
    "slow-hvg": (["--backbone", "slow-hvg", "--chunk-rows", "20", "--quiet"], True),
    "hvg": (["--backbone", "hvg", "--chunk-rows", "20", "--quiet"], False),
    "pca --force": (["--backbone", "pca", "--force", "--quiet"], False),
}


def extraction_ref(b: Bench, name: str):
    args, slow = EXTRACTIONS[name]
    backbone = args[1]
    w = b.dir("ref-extract")
    st = b.copy(w / "st")
    env = env_for(slow_env(w)) if slow else None
    seconds, r = timed(lambda: cli("extract", "--store", st, *args, env=env))
    assert r.rc == 0, r.describe()
    return seconds, embeddings(st, backbone)


def extraction_kill(b: Bench, name: str, hold_after: int | None = None, delay: float | None = None) -> Trial:
    args, slow = EXTRACTIONS[name]
    backbone = args[1]
    _, clean = b.ref(("extract", name), lambda: extraction_ref(b, name))
    w = b.dir("kill-extract")
    st = b.copy(w / "st")
    from scdrugmap.store.store import Store

    old = embeddings(st, backbone) if backbone in Store.open(st).extracted_backbones() else {}
    how = f"after {hold_after} chunks" if hold_after is not None else f"at {delay:.2f} s"
    t = Trial(f"extract --backbone {' '.join(args[1:])}, SIGKILL {how}")
    env = env_for(slow_env(w, hold_after=hold_after)) if slow else None
    proc = start("extract", "--store", st, *args, env=env)
    if hold_after is not None:
        held(proc, w, hold_after)
        landed = kill(proc)
    else:
        landed = kill_after(proc, delay)
    t.notes.append("landed" if landed else "finished before the kill")
    # what a reader sees now: whole datasets, as before the command or as after it, nothing half-written
    committed = sorted(Store.open(st).provenance(backbone)["dataset"])
    if committed:
        seen = embeddings(st, backbone, datasets=committed)
        other = [d for d in committed if seen[d] not in (clean[d], old.get(d))]
        t.same(not other, f"right after the kill a reader saw values of {other} that are neither the old nor the new")
    rerun = t.judge(cli("extract", "--store", st, *args, env=env_for(slow_env(w)) if slow else None))
    t.same(rerun.rc == 0, "the rerun did not complete")
    if rerun.rc == 0:
        t.same(embeddings(st, backbone) == clean, "embeddings differ from an uninterrupted run's")
    verify = t.judge(cli("store", "verify", st))
    t.same(verify.rc == 0, f"store verify failed: {verify.err}")
    left = leftovers(st)
    t.same(not left, f"left after the rerun: {left}")
    shutil.rmtree(w)
    return t


def kind_extraction(b: Bench, kind: Kind):
    n_gate, n_hvg, n_pca = (1, 1, 0) if b.quick else (2, 2, 2)
    # held by the slow-hvg plugin after exactly k of its 40 chunks (10 datasets x 4 chunks of 20 rows)
    for k in sorted(int(x) for x in b.spread(n_gate, 0, 40)):
        kind.add(extraction_kill, b, "slow-hvg", hold_after=k)
    for name, n in (("hvg", n_hvg), ("pca --force", n_pca)):
        if not n:
            continue
        seconds, _ = b.ref(("extract", name), lambda: extraction_ref(b, name))
        kind.extra.append(f"uninterrupted `extract {' '.join(EXTRACTIONS[name][0])}`: {seconds:.1f} s")
        for delay in b.spread(n, 0.3, seconds):
            kind.add(extraction_kill, b, name, delay=delay)


# ---- 2. kills during other commands -----------------------------------------------------------
def other_args(b: Bench, name: str, st: Path, dest: Path) -> list:
    return {"ingest": ["ingest", *b.ingest_args[:1], "--store", dest, *b.ingest_args[1:]],
            "probe": ["probe", "--store", st, "--backbone", "pca", "--quiet"],
            "store pack": ["store", "pack", b.src, dest],
            "store unpack": ["store", "unpack", b.pack_tar, dest],
            "store merge": ["store", "merge", b.src, b.base, "--into", dest]}[name]


def other_result(name: str, st: Path, dest: Path):
    if name == "store pack":
        return pack_signature(dest)
    if name == "store unpack":
        return snapshot(dest)
    return contents(dest)


def other_ref(b: Bench, name: str):
    w = b.dir("ref-other")
    st = b.copy(w / "st") if name == "probe" else None
    (w / "out").mkdir()
    dest = w / "out" / "dest"
    seconds, r = timed(lambda: cli(*other_args(b, name, st, dest)))
    assert r.rc == 0, r.describe()
    if name == "probe":                                          # the new run alone
        return seconds, new_runs(st, probe_runs(b.base))
    return seconds, other_result(name, st, dest)


def new_runs(path: Path, before: dict) -> list:
    return sorted(sig for run_id, sig in probe_runs(path).items() if run_id not in before)


def other_kill(b: Bench, name: str, delay: float | None) -> Trial:
    seconds, clean = b.ref(("other", name), lambda: other_ref(b, name))
    w = b.dir("kill-other")
    st = b.copy(w / "st") if name == "probe" else None
    out = w / "out"
    out.mkdir()
    dest = out / "dest"
    args = other_args(b, name, st, dest)
    before_files = set(snapshot(st)) if st else None
    before_runs = probe_runs(st) if st else None
    t = Trial(f"{name}, SIGKILL " + ("while its work folder exists" if delay is None else f"at {delay:.2f} s"))
    landed = False
    for _ in range(1 if delay is not None else 5):              # until the kill lands in the window
        proc = start(*args)
        if delay is None:
            while proc.poll() is None and not [p for p in out.iterdir()
                                               if p.name.startswith(".dest.") and not p.name.endswith(".lock")]:
                pass
            landed = kill(proc)
        else:
            landed = kill_after(proc, delay)
        if landed:
            break
        shutil.rmtree(dest, ignore_errors=True)
    t.notes.append("landed" if landed else "finished before the kill")
    target = st if name == "probe" else dest
    finished_before = name != "probe" and dest.exists()          # killed after its final rename: complete
    if finished_before:                       # the rerun may refuse, in one line, to overwrite it
        t.notes.append("the destination was complete when killed")
    rerun = t.judge(cli(*args))
    t.same(rerun.rc == 0 or finished_before, "the rerun did not complete")
    if name == "probe":
        new = new_runs(st, before_runs)
        # the killed run stored whole or not at all, the rerun stored once, both the clean result
        t.same(len(new) in (1, 2) and all(x == clean[0] for x in new), f"probe runs after the rerun: {len(new)} new, "
                                                                      "not all equal to a clean run's")
        extra = sorted(set(snapshot(st)) - before_files)
        t.same(not extra, f"files left in the store: {extra}")
    else:
        t.same(dest.exists() and other_result(name, st, dest) == clean,
               "the result differs from an uninterrupted run's")
        names = sorted(p.name for p in out.iterdir())
        t.same(names == ["dest"], f"beside the destination after the rerun: {names}")
    verify = t.judge(cli("store", "verify", target))
    t.same(verify.rc == 0, f"store verify failed: {verify.err}")
    if name != "store pack":
        left = leftovers(target)
        t.same(not left, f"left after the rerun: {left}")
    shutil.rmtree(w)
    return t


def kind_other(b: Bench, kind: Kind):
    for name in ("ingest", "probe", "store pack", "store unpack", "store merge"):
        seconds, _ = b.ref(("other", name), lambda: other_ref(b, name))
        kind.extra.append(f"uninterrupted `{name}`: {seconds:.1f} s")
        # the event the unit test waits for (a work folder exists), then moments spread over the run
        delays = [] if name == "probe" else [None]
        if not (b.quick and delays):
            delays += b.spread(2 if name == "probe" and not b.quick else 1, 0.3, seconds)
        for delay in delays:
            kind.add(other_kill, b, name, delay)
    after = snapshot(b.src)
    if after != b.src_snapshot:
        kind.trials.append(Trial("the source of pack and merge", identical=False,
                                 problems=["not identical: store pack/merge changed their source store"]))


# ---- 3. byte flips -------------------------------------------------------------------------------
def flip_targets(st: Path) -> dict:
    z = st / "embeddings.zarr"
    return {"chunk": sorted(p for p in z.glob("*/*/*/c/**/*") if p.is_file()),
            "zarr.json": sorted(z.glob("*/*/*/zarr.json")),
            "index.duckdb": [st / "index.duckdb"]}


def export_ref(b: Bench):
    w = b.dir("ref-export")
    r = cli("export", "--store", b.base, "--backbone", "pca", "--to", w / "out.parquet")
    assert r.rc == 0, r.describe()
    return parquet_signature(w / "out.parquet")


def parquet_signature(path: Path) -> str:
    import pandas as pd

    return digest(pd.read_parquet(path))


def flip_trials(b: Bench, target: str) -> list[Trial]:
    w = b.dir("flip")
    st = b.copy(w / "st")
    file = b.rng.choice(flip_targets(st)[target])
    rel = file.relative_to(st).as_posix()
    data = bytearray(file.read_bytes())
    offset, bit = b.rng.randrange(len(data)), b.rng.randrange(8)
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))
    array = "/".join(rel.split("/")[1:4]) if target != "index.duckdb" else None
    before = snapshot(st)
    out = w / "out"
    out.mkdir()
    trials = []
    for command in (["store", "verify", st],
                    ["export", "--store", st, "--backbone", "pca", "--to", out / "x.parquet"],
                    ["probe", "--store", st, "--backbone", "pca", "--quiet"]):
        label = " ".join(map(str, command[:2] if command[0] == "store" else command[:1]))
        t = Trial(f"{label}, bit {bit} of byte {offset:,} of {target} flipped")
        r = cli(*command)
        named = (array in r.err) if array else ("index" in r.err and ("damaged" in r.err or "not a" in r.err))
        if r.rc == 0 and target != "chunk":
            # a flip in bytes the index does not use, or one that leaves zarr.json meaning the same
            # (a misspelt key zarr ignores, the unused fill value), is harmless: what was read must be right
            try:
                if command[0] == "store":
                    right = contents(st) == b.ref("contents", lambda: contents(b.base))
                elif command[0] == "export":
                    right = parquet_signature(out / "x.parquet") == b.ref("export", lambda: export_ref(b))
                else:
                    right = (new_runs(st, probe_runs(b.base))
                             == b.ref(("other", "probe"), lambda: other_ref(b, "probe"))[1])
            except Exception as e:                # reading it back here fails
                from scdrugmap.errors import UserError

                # the command did not read the damaged block (DuckDB checks each block it reads);
                # reading the result back does, and names the damage: caught, not a wrong value
                right = isinstance(e, UserError) and "index" in str(e) and "damaged" in str(e)
                if right:
                    t.notes.append(f"{target}: passed without reading the damaged block, which is named "
                                   "when read back")
                else:
                    t.problems.append(f"reading it back: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            else:
                if right:
                    t.notes.append(f"{target}: passed, what it read is right")
            t.judge(r, expect=right, why=f"exit 0, but what it read differs from the undamaged store's ({rel} damaged)")
            if command[0] != "probe":                 # a probe that passed stored its run, as it should
                t.same(snapshot(st) == before, "the store changed")
        else:
            t.judge(r, expect=r.rc == 2 and named, why=f"the damage ({rel}) was not named in one line")
            t.same(snapshot(st) == before, "the store changed")
        written = sorted(p.name for p in out.iterdir())
        t.same(not written or r.rc == 0, f"written by a refused command: {written}")
        for p in out.iterdir():
            p.unlink()
        trials.append(t)
    shutil.rmtree(w)
    return trials


def kind_flips(b: Bench, kind: Kind):
    for _ in range(1 if b.quick else 2):
        for target in ("chunk", "zarr.json", "index.duckdb"):
            kind.add(flip_trials, b, target)


# ---- 4. full disk and 5. read-only disk -----------------------------------------------------
def disk_inputs(b: Bench) -> dict:
    import numpy as np

    npy = b.work / "emb.npy"
    if not npy.exists():
        np.save(npy, np.random.default_rng(0).normal(size=(80, 300)).astype(np.float32))
    gbm = GBM if GBM.exists() else b.data / "SimData1.h5ad"
    return {"gbm": str(gbm), "npy": str(npy)}


def disk_run(b: Bench, kind: Kind, run: dict, **how) -> list | None:
    from small_disk import run_on_small_disk

    w = b.dir("disk")
    try:
        results = run_on_small_disk(b.base, list(run.values()), w, **how)
    except AssertionError as e:                  # the namespace started but the runner failed
        kind.skipped = f"the small-disk runner failed: {str(e).strip().splitlines()[-1:]}"
        return None
    finally:
        shutil.rmtree(w, ignore_errors=True)
    if results is None:
        kind.skipped = ("no mount namespace can be made here ('unshare --user --map-root-user --mount' "
                        "or the tmpfs mount was refused)")
    return results


def disk_trial(name: str, r: dict, label: str, expect_ok: bool, reason: tuple, changes_ok: bool) -> Trial:
    t = Trial(f"{name}, {label}")
    result = Result(r["command"], r["rc"], r["stdout"], r["stderr"])
    if expect_ok:
        t.judge(result, expect=r["rc"] == 0, why="a command that needs no write failed")
    else:
        t.judge(result, expect=r["rc"] == 0 or any(x in result.err for x in reason),
                why=f"the real cause ({' / '.join(reason)}) was not named")
    if not r["verified"]:
        t.survived = False
        t.problems.append("store verify fails after it")
    hidden = [f for f in r["other_files"] if f.startswith(".")]
    t.same(not hidden and (r["rc"] == 0 or r["other_files"] in ([], ["p.tar"], ["x.parquet"])),
           f"left on the disk: {r['other_files']}")
    t.same(r["unchanged"] or (r["rc"] == 0 or changes_ok) and r["verified"],
           f"the store changed: {r['changed'][:5]}")
    return t


def kind_full_disk(b: Bench, kind: Kind):
    from test_disks import commands

    cmds = commands(disk_inputs(b))
    names = list(cmds)
    runs = [(0, b.rng.sample(names, 2) if b.quick else names)]
    if not b.quick:
        runs.append((b.rng.randrange(16 << 10, 2 << 20), sorted(b.rng.sample(names, 4), key=names.index)))
    for free, chosen in runs:
        results = disk_run(b, kind, {n: cmds[n] for n in chosen}, free=free)
        if results is None:
            return
        for name, r in zip(chosen, results):
            # an extraction of several datasets keeps those it committed whole before the disk filled
            kind.trials.append(disk_trial(name, r, f"{free:,} bytes free", False,
                                          ("no space left on the device", "cannot write"),
                                          changes_ok=name.startswith("extract") and free > 0))


def kind_read_only(b: Bench, kind: Kind):
    from test_disks import commands

    cmds = {"query": ["query", "--store", "{st}", "SELECT count(*) AS n FROM cells"],
            "store verify": ["store", "verify", "{st}"], "store info": ["store", "info", "{st}"],
            **commands(disk_inputs(b))}
    chosen = ["query", *b.rng.sample(list(cmds)[1:], 3)] if b.quick else list(cmds)
    results = disk_run(b, kind, {n: cmds[n] for n in chosen}, readonly=True)
    if results is None:
        return
    for name, r in zip(chosen, results):
        reading = name in ("query", "store verify", "store info", "probe")
        t = disk_trial(name, r, "read-only disk", reading, ("read-only",), changes_ok=False)
        if name == "query" and "800" not in r["stdout"]:
            t.survived = False
            t.problems.append(f"query gave no count of 800 cells: {r['stdout'][-200:]}")
        if name == "probe" and "results are shown, not stored" not in r["stderr"]:
            t.survived = False
            t.problems.append(f"probe did not say its results are not stored: {r['stderr'][-300:]}")
        kind.trials.append(t)


# ---- 6. concurrency ---------------------------------------------------------------------------------
def two_extracts_held(b: Bench, hold_after: int) -> Trial:
    """The second extract of a backbone starts while the first is held after ``hold_after`` chunks;
    a reader queries the store meanwhile."""
    _, clean = b.ref(("extract", "slow-hvg"), lambda: extraction_ref(b, "slow-hvg"))
    w = b.dir("two-extracts")
    st = b.copy(w / "st")
    args = ["extract", "--store", st, *EXTRACTIONS["slow-hvg"][0]]
    t = Trial(f"a second extract while the first is held after {hold_after} chunks; a query meanwhile")
    first = start(*args, env=env_for(slow_env(w, hold_after=hold_after)))
    held(first, w, hold_after)
    second = cli(*args, env=env_for(slow_env(w)))
    t.judge(second, expect=second.refused("another 'scdrugmap extract --backbone slow-hvg' is running"),
            why="the second extract was not refused in one line")
    q = cli("query", "--store", st, "SELECT count(*) AS n FROM cells")
    t.judge(q, expect=q.rc == 0 and "800" in q.stdout, why="the reader did not see 800 cells")
    (w / "go").touch()
    done = t.judge(finish(first))
    t.same(done.rc == 0, "the first extract did not finish")
    t.same(done.rc == 0 and embeddings(st, "slow-hvg") == clean, "embeddings differ from a lone run's")
    left = leftovers(st)
    t.same(not left, f"left behind: {left}")
    shutil.rmtree(w)
    return t


def two_extracts_at_once(b: Bench) -> Trial:
    _, clean = b.ref(("extract", "hvg"), lambda: extraction_ref(b, "hvg"))
    w = b.dir("two-extracts")
    st = b.copy(w / "st")
    args = ["extract", "--store", st, *EXTRACTIONS["hvg"][0]]
    t = Trial("two extracts of hvg started at the same moment")
    procs = [start(*args), start(*args)]
    results = [t.judge(finish(p)) for p in procs]
    codes = sorted(r.rc for r in results)
    refused = [r for r in results if r.rc]
    # one refused in one line; or the second started after the first had finished and skipped all
    t.judge(results[0], expect=codes == [0, 0] or (codes == [0, 2] and refused[0].refused("is running")),
            why=f"not one finished and one refused: exits {codes}")
    t.same(embeddings(st, "hvg") == clean, "embeddings differ from a lone run's")
    left = leftovers(st)
    t.same(not left, f"left behind: {left}")
    shutil.rmtree(w)
    return t


PROBES = (("lr", 1), ("lr", 2), ("lgbm", 1), ("mlp", 1))


def probe_ref(b: Bench, head: str, seed: int):
    w = b.dir("ref-probe")
    st = b.copy(w / "st")
    r = cli("probe", "--store", st, "--backbone", "pca", "--head", head, "--seed", seed, "--quiet")
    assert r.rc == 0, r.describe()
    sig = probe_signatures(st, f"head = '{head}' AND seed = {seed}")
    shutil.rmtree(w)
    return sig


def four_probes(b: Bench) -> Trial:
    w = b.dir("four-probes")
    st = b.copy(w / "st")
    t = Trial("four probes at once (lr seed 1, lr seed 2, lgbm, mlp)")
    before = probe_runs(st)
    procs = [start("probe", "--store", st, "--backbone", "pca", "--head", head, "--seed", seed, "--quiet")
             for head, seed in PROBES]
    results = [t.judge(finish(p)) for p in procs]
    t.judge(results[0], expect=all(r.rc == 0 for r in results), why="not every probe finished")
    t.same(len(probe_signatures(st)) == len(before) + 4, "not every run was stored")
    for head, seed in PROBES:
        got = probe_signatures(st, f"head = '{head}' AND seed = {seed}")
        t.same(got == b.ref(("probe", head, seed), lambda: probe_ref(b, head, seed)),
               f"the {head} seed {seed} run differs from the same probe run alone")
    left = leftovers(st)
    t.same(not left, f"left behind: {left}")
    shutil.rmtree(w)
    return t


def reader_waits(b: Bench) -> Trial:
    from test_concurrency import HOLDER

    w = b.dir("reader")
    st = b.copy(w / "st")
    before = snapshot(st)
    t = Trial("a query while another process holds the index for writing")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(st / "index.duckdb")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        log = w / "stderr.txt"
        with open(log, "w") as err:
            reader = start("query", "--store", st, "SELECT count(*) AS n FROM cells", stderr=err)
            wait_for(lambda: "waiting for process" in log.read_text(), reader, "the reader's waiting message",
                     limit=CALL_LIMIT)
            holder.communicate("\n", timeout=60)
            out, _ = reader.communicate(timeout=CALL_LIMIT)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    r = Result(reader.args[len(CLI):], reader.returncode, out, "")    # its stderr: the waiting message
    t.judge(r, expect=r.rc == 0 and "800" in out, why="the reader did not read 800 cells after the wait")
    t.same(snapshot(st) == before, "the store changed")
    shutil.rmtree(w)
    return t


def kind_concurrency(b: Bench, kind: Kind):
    for k in sorted(int(x) for x in b.spread(1 if b.quick else 2, 0, 40)):
        kind.add(two_extracts_held, b, k)
    if not b.quick:
        kind.add(two_extracts_at_once, b)
        kind.add(four_probes, b)
    kind.add(reader_waits, b)


# ---- 7. hostile SQL ---------------------------------------------------------------------------------
def parametrized(fn) -> list:
    """The cases of a test's @pytest.mark.parametrize."""
    return next(m.args[1] for m in fn.pytestmark if m.name == "parametrize")


def sql_attacks(tmp: Path, st: Path) -> list[tuple[str, list, str]]:
    import test_sql_safety as S

    attacks = [(f"query {sql[:60]}", ["query", "--store", st, sql.format(st=st, tmp=tmp)], match)
               for sql, match in S.QUERY_ATTACKS]
    for where in parametrized(S.test_probe_where_cannot_read_files):
        attacks.append((f"probe --where {where[:50]}", ["probe", "--store", st, "--backbone", "pca", "--where",
                                                         where.format(tmp=tmp), "--quiet"], "disabled by configuration"))
    for where, match in parametrized(S.test_where_cannot_escape_its_parentheses):
        attacks.append((f"probe --where {where[:50]}", ["probe", "--store", st, "--backbone", "pca", "--where", where,
                                                         "--quiet"], match))
    attacks.append(("leaderboard --where read_text", ["leaderboard", "--store", st, "--where",
                                                      f"head IN (SELECT content FROM read_text('{tmp}/*'))"],
                    "disabled by configuration"))
    return attacks


def kind_sql(b: Bench, kind: Kind):
    w = b.dir("sql")
    tmp = w / "outside"
    tmp.mkdir()
    (tmp / "secret.txt").write_text(SECRET + "\n")
    st = b.copy(w / "st")
    attacks = sql_attacks(tmp, st)
    if b.quick:
        attacks = b.rng.sample(attacks[:-1], 3) + attacks[-1:]
    for label, command, match in attacks:
        t = Trial(label)
        before, files = snapshot(st), sorted(p.name for p in w.rglob("*"))
        r = cli(*command)
        t.judge(r, expect=r.refused(match) and SECRET not in r.stdout + r.stderr,
                why=f"not refused with '{match}'")
        t.same(snapshot(st) == before, "the store changed")
        after = sorted(p.name for p in w.rglob("*"))
        t.same(after == files, f"files written: {sorted(set(after) - set(files))}")
        kind.trials.append(t)
    shutil.rmtree(w)


# ---- the run ----------------------------------------------------------------------------------------
KINDS = [
    ("extract", "1. kills during extraction",
     "the rerun and `store verify` (exit 0 or one-line error)",
     "right after the kill a reader sees whole datasets, each as before the command or as after an "
     "uninterrupted run; the rerun completes, "
     "its embeddings equal an uninterrupted run's (Store.load arrays and cells), `store verify` passes, "
     "nothing is left to reclaim", kind_extraction),
    ("other", "2. kills during ingest, probe, store pack/unpack/merge",
     "the rerun and `store verify` (exit 0 or one-line error)",
     "the rerun completes (or, if the kill came after the final rename, the destination is already whole) and "
     "gives an uninterrupted run's result (store contents / manifest / unpacked bytes / probe metrics); "
     "the killed probe stored its run whole or not at all; nothing left beside or in the destination; "
     "`store verify` passes", kind_other),
    ("flips", "3. byte flips (chunk, zarr.json, index.duckdb)",
     "`store verify`, export and probe each exit 2 with one line naming the damaged array or the index "
     "(a flip in bytes a command does not read may pass it: then what it read must equal the undamaged "
     "store's - export file, probe metrics, store contents - or reading it back must name the damage)",
     "the store is byte for byte as before (but for the run a passing probe stores) and a refused export "
     "wrote nothing", kind_flips),
    ("full", "4. full disk (tmpfs, 0 bytes and a random amount free)",
     "each command: exit 0, or one line naming the full disk; `store verify` passes after it",
     "a refused command leaves the store byte for byte as before (an extraction may keep the datasets it "
     "committed whole) and no hidden file on the disk; one that succeeded leaves a store that verifies",
     kind_full_disk),
    ("readonly", "5. read-only disk",
     "reading commands succeed (probe prints, says it did not store); writing ones give one line naming "
     "the read-only disk; `store verify` passes after each",
     "the store is byte for byte as before", kind_read_only),
    ("concurrency", "6. concurrency",
     "the second extract refused in one line, the first finishes; all four probes finish; a reader waits "
     "for a writer and then reads",
     "the embeddings and probe runs equal those of the same commands run alone; the reader leaves the store "
     "byte for byte as before; nothing left behind", kind_concurrency),
    ("sql", "7. hostile SQL (query, probe --where, leaderboard --where)",
     "refused: exit 2, one line with the expected reason, no secret in the output",
     "the store is byte for byte as before and no file was written outside it", kind_sql),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few trials per kind (about a minute)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments, flipped bytes and samples")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    print(f"fault_bench: {'--quick' if args.quick else 'default'} run, seed {args.seed}")
    print(f"machine: {machine()}")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    kinds = []
    with tempfile.TemporaryDirectory(prefix="fault-bench-") as tmp:
        b = Bench(Path(tmp), args.quick, args.seed)
        print(f"small store: 10 datasets x 80 cells, pca, one probe run; built in {b.setup():.1f} s", flush=True)
        for key, title, surv, ident, run in KINDS:
            kind = Kind(key, title, surv, ident)
            t = time.perf_counter()
            try:
                run(b, kind)
            except Exception as e:                 # a trial that could not even be judged
                kind.trials.append(Trial(f"(aborted) {type(e).__name__}", survived=False, identical=False,
                                         problems=[traceback.format_exc(limit=3).strip()[-1500:]]))
            kind.seconds = time.perf_counter() - t
            kinds.append(kind)
            report(kind)

    total = [t for k in kinds for t in k.trials]
    n_s, n_i = sum(t.survived for t in total), sum(t.identical for t in total)
    print("\nsummary")
    width = max(len(k.title) for k in kinds)
    for k in kinds:
        row = (f"skipped: {k.skipped}" if k.skipped and not k.trials else
               f"{len(k.trials):3d} trials, {sum(t.survived for t in k.trials):3d} survived, "
               f"{sum(t.identical for t in k.trials):3d} identical  [{k.seconds:5.1f} s]")
        print(f"  {k.title:<{width}}  {row}")
    print(f"load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    print(f"total: {len(total)} trials, {n_s} survived, {n_i} identical")
    return 0 if n_s == n_i == len(total) else 1


def report(kind: Kind):
    print(f"\n{kind.title}")
    print(f"  survived means: {kind.survived_rule}")
    print(f"  identical means: {kind.identical_rule}")
    for line in kind.extra:
        print(f"  {line}")
    if kind.skipped:
        print(f"  skipped: {kind.skipped}")
    notes = {}
    for t in kind.trials:
        for n in t.notes:
            notes[n] = notes.get(n, 0) + 1
    if notes:
        print("  " + "; ".join(f"{v} x {k}" for k, v in notes.items()))
    print(f"  {len(kind.trials)} trials, {sum(t.survived for t in kind.trials)} survived, "
          f"{sum(t.identical for t in kind.trials)} identical [{kind.seconds:.1f} s]", flush=True)
    for t in kind.trials:
        if t.problems:
            print(f"  FAILED: {t.name}")
            for p in t.problems:
                print(f"    {p}")


if __name__ == "__main__":
    sys.exit(main())
