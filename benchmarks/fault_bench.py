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

Run: ``python benchmarks/fault_bench.py [--quick] [--seed N]`` (about 4 minutes; --quick about 1).
Exit status 1 when any trial did not survive or was not identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT / "tests" / "store", ROOT / "tests", HERE):      # how the tests import their helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from common import machine  # noqa: E402

import conftest  # noqa: E402  (sets OMP_NUM_THREADS=1 for the processes started here)
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
    from scdrugmap.store.store import Store

    df = Store.open(path).sql(
        "SELECT r.run_id, r.* EXCLUDE (run_id, created_at), p.* EXCLUDE (run_id, fit_seconds) "
        f"FROM probe_runs r JOIN probe_results p USING (run_id) WHERE {where} ORDER BY r.run_id, p.split")
    return sorted(digest(g.drop(columns="run_id")) for _, g in df.groupby("run_id"))


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
    how = f"after {hold_after} chunks" if hold_after is not None else f"at {delay:.2f} s"
    t = Trial(f"extract --backbone {' '.join(args[1:])}, SIGKILL {how}")
    env = env_for(slow_env(w, hold_after=hold_after)) if slow else None
    proc = start("extract", "--store", st, *args, env=env)
    if hold_after is not None:
        wait_for(lambda: (w / "holding").exists(), proc, f"chunk {hold_after + 1}", limit=CALL_LIMIT)
        landed = kill(proc)
    else:
        landed = kill_after(proc, delay)
    t.notes.append("landed" if landed else "finished before the kill")
    # what a reader sees now: whole datasets of the clean result, nothing half-written
    from scdrugmap.store.store import Store

    committed = sorted(Store.open(st).provenance(backbone)["dataset"])
    if committed:
        seen = embeddings(st, backbone, datasets=committed)
        t.same(all(seen[d] == clean[d] for d in committed), f"a reader saw other values of {committed}")
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
    n_gate, n_hvg, n_pca = (1, 1, 0) if b.quick else (3, 3, 2)
    # held by the slow-hvg plugin after exactly k of its 40 chunks (10 datasets x 4 chunks of 20 rows)
    for k in sorted(int(x) for x in b.spread(n_gate, 0, 40)):
        kind.trials.append(extraction_kill(b, "slow-hvg", hold_after=k))
    for name, n in (("hvg", n_hvg), ("pca --force", n_pca)):
        if not n:
            continue
        seconds, _ = b.ref(("extract", name), lambda: extraction_ref(b, name))
        kind.extra.append(f"uninterrupted `extract {' '.join(EXTRACTIONS[name][0])}`: {seconds:.1f} s")
        for delay in b.spread(n, 0.3, seconds):
            kind.trials.append(extraction_kill(b, name, delay=delay))


# ---- 2. kills during other commands -----------------------------------------------------------
def other_args(b: Bench, name: str, st: Path, dest: Path) -> list:
    return {"ingest": ["ingest", *b.ingest_args[:1], "--store", dest, *b.ingest_args[1:]],
            "probe": ["probe", "--store", st, "--backbone", "pca", "--quiet"],
            "store pack": ["store", "pack", b.src, dest],
            "store unpack": ["store", "unpack", b.pack_tar, dest],
            "store merge": ["store", "merge", b.src, b.base, "--into", dest]}[name]


def other_result(name: str, st: Path, dest: Path):
    if name == "probe":
        return probe_signatures(st)
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
    before = probe_signatures(b.base)
    result = other_result(name, st, dest)
    if name == "probe":
        result = [x for x in result if x not in before]         # the new run alone
    return seconds, result


def other_kill(b: Bench, name: str, delay: float | None) -> Trial:
    seconds, clean = b.ref(("other", name), lambda: other_ref(b, name))
    w = b.dir("kill-other")
    st = b.copy(w / "st") if name == "probe" else None
    out = w / "out"
    out.mkdir()
    dest = out / "dest"
    args = other_args(b, name, st, dest)
    before_files = set(snapshot(st)) if st else None
    before_runs = probe_signatures(st) if st else None
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
        new = [x for x in probe_signatures(st) if x not in before_runs]
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
    n_timed = 1 if b.quick else 2
    for name in ("ingest", "probe", "store pack", "store unpack", "store merge"):
        seconds, _ = b.ref(("other", name), lambda: other_ref(b, name))
        kind.extra.append(f"uninterrupted `{name}`: {seconds:.1f} s")
        # the event the unit test waits for (a work folder exists), then moments spread over the run
        delays = [] if name == "probe" else [None]
        if not (b.quick and delays):
            delays += b.spread(n_timed, 0.3, seconds)
        for delay in delays:
            kind.trials.append(other_kill(b, name, delay))
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
        named = "damaged" in r.err or "missing" in r.err or "not a" in r.err
        named = named and ((array in r.err) if array else "index" in r.err)
        if r.rc == 0 and target == "index.duckdb":
            # a flip in bytes the index does not use is harmless: then what was read must be right
            t.notes.append("flip in unused bytes of the index: read correctly")
            t.judge(r)
            if command[0] == "store":
                t.same(contents(st) == b.ref("contents", lambda: contents(b.base)),
                       "verify passed, but the index reads differently from the undamaged one")
                t.same(snapshot(st) == before, "the store changed")
            elif command[0] == "export":
                t.same(parquet_signature(out / "x.parquet") == b.ref("export", lambda: export_ref(b)),
                       "the export differs from an undamaged store's")
                t.same(snapshot(st) == before, "the store changed")
            else:
                new = [x for x in probe_signatures(st) if x not in probe_signatures(b.base)]
                t.same(new == b.ref(("other", "probe"), lambda: other_ref(b, "probe"))[1],
                       "the probe run differs from an undamaged store's")
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
            kind.trials.extend(flip_trials(b, target))
