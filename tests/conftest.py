"""Shared fixtures: the real data in ../shared, a CLI runner, and store snapshots."""

from __future__ import annotations

import os

# Two pytest workers share two cores: one OpenMP thread each, or LightGBM spin-waits for a
# busy core (a 2,000-cell fit went from 0.1 s to 75 s). Set before LightGBM loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import shutil
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
