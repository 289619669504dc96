"""Shared fixtures: the real data in ../shared, a CLI runner, and store snapshots."""

from __future__ import annotations

import os

# Two pytest workers share two cores: one OpenMP thread each, or LightGBM spin-waits for a
# busy core (a 2,000-cell fit went from 0.1 s to 75 s). Set before LightGBM loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PC9 = SHARED / "data" / "pc9_erlotinib.h5ad"
GBM = SHARED / "data" / "glioblastoma_panobinostat.h5ad"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} not found: the shared test data is expected at ../shared")
    return path


@pytest.fixture
def pc9() -> Path:
    return need_shared(PC9)


@pytest.fixture
def gbm() -> Path:
    return need_shared(GBM)


class Cli:
    """Runs ``scdrugmap`` in-process; ``ok`` asserts exit 0, ``fails`` asserts a one-line exit-2 error."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, env=None):
        return self.runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)

    def ok(self, *args, env=None):
        result = self(*args, env=env)
        assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes else "")
        return result

    def fails(self, *args, match: str, env=None):
        result = self(*args, env=env)
        err = result.stderr.strip()
        assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
        assert err.startswith("Error: ") and "\n" not in err, err
        assert "Traceback" not in result.output
        assert match.lower() in err.lower(), err
        return err


@pytest.fixture
def cli() -> Cli:
    return Cli()


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its sha256: equal snapshots mean an untouched store."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file into tmp_path (so a test may modify it)."""
    def make(path: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(path).name)
        shutil.copy(path, dst)
        return dst
    return make


def copy_store(src: Path, folder: Path, name: str = "st") -> Path:
    """A copy of the store ``src`` as ``folder/name``, for a test that changes it."""
    dst = folder / name
    shutil.copytree(src, dst)
    return dst


def ingest_pc9_and_gbm(cli: Cli, store: Path, pc9_extra=(), gbm_extra=(), quiet: bool = True) -> Path:
    """The shared PC9 file as dataset 'pc9' (samples, response) and the glioblastoma file as
    'gbm' (patients, ctrl = sensitive, panobinostat = resistant), in ``store``."""
    need_shared(PC9), need_shared(GBM)
    q = ["--quiet"] if quiet else []
    cli.ok("ingest", PC9, "--store", store, "--dataset", "pc9", "--label-col", "response", "--sample-col",
           "sample_id", *pc9_extra, *q)
    cli.ok("ingest", GBM, "--store", store, "--dataset", "gbm", "--label-col", "condition", "--sensitive", "ctrl",
           "--resistant", "panobinostat", "--patient-col", "patient_id", *gbm_extra, *q)
    return store


SMALL_DATASETS, SMALL_CELLS, SMALL_CHUNK = 10, 80, 40


def build_small_store(root: Path, n_datasets: int = SMALL_DATASETS, cells: int = SMALL_CELLS,
                      chunk_rows: int = SMALL_CHUNK, seed: int = 0, probe: bool = True) -> Path:
    """Simulated sources in ``root/data`` and a store in ``root/store``: ``pca`` in chunks of
    ``chunk_rows`` rows and (with ``probe``) one stored probe run. About 2 s."""
    from scdrugmap.demo import demo_genes
    from scdrugmap.extract.runner import extract
    from scdrugmap.probe.run import run_probe
    from scdrugmap.simulate import simulate_cohort, write_cohort
    from scdrugmap.store.ingest import IngestRequest, ingest
    from scdrugmap.store.store import Store

    cohort = simulate_cohort(n_datasets=n_datasets, cells_per_dataset=cells, samples_per_dataset=4,
                             genes=demo_genes(1000), seed=seed)
    for (name, _, meta), path in zip(cohort, write_cohort(cohort, root / "data")):
        ingest(root / "store", IngestRequest(
            file=path, dataset=name, label_col="response", sample_col="sample_id", patient_col="patient_id",
            context={k: meta.get(k) for k in ("drug", "cancer_type", "tissue", "therapy", "regimen")}))
    store = Store.open(root / "store")
    extract(store, "pca", chunk_rows=chunk_rows, show_progress=False)
    if probe:
        run_probe(store, "pca", head="lr", protocol="pooled", seed=0, show_progress=False)
    return root / "store"


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """A simulated store (10 datasets x 80 cells, pca in 2 chunks per dataset, one probe run),
    built once per test worker. Read it only: ``store_copy()`` gives a copy to change."""
    return build_small_store(tmp_path_factory.mktemp("small"))


@pytest.fixture
def store_copy(small_store, tmp_path):
    def make(name: str = "st") -> Path:
        return copy_store(small_store, tmp_path, name)
    return make


def slow_env(tmp_path, hold_after=None, seconds=0):
    """The environment of a real extraction with the slow-hvg test plugin (tests/plugins)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "plugins"), env.get("PYTHONPATH", "")])
    env["SCDRUGMAP_PLUGINS"] = "slow_backbone"
    env["SLOW_HVG_SECONDS"] = str(seconds)
    env["SLOW_HVG_LOG"] = str(tmp_path / "chunks.log")
    if hold_after is not None:
        env["SLOW_HVG_HOLD_AFTER"] = str(hold_after)
        env["SLOW_HVG_GATE"] = str(tmp_path)
    return env


def wait_for(condition, proc=None, what="the event", limit=600):
    """Wait until ``condition()`` holds (an event of the process under test, not a clock: ``limit``
    only stops a hung test), failing early if ``proc`` exits first."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)
