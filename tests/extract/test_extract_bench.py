"""benchmarks/extract_bench.py's one-call mode (``--all --budget --jsonl``), run end to end on the
CPU at tiny shapes (``--tiny``), so that a GPU run of the same command is known to work: every
backbone of the list streams one JSON line, checkpoints are built in a spawned process, and a
spent budget skips the rest instead of failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints as ck

pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "extract_bench.py"


def _run(tmp_path, *args):
    if not ck.PC9.exists():
        pytest.skip("PC9 data not found at ../shared")
    env = {**os.environ, "SCDRUGMAP_BENCH_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--jsonl", *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_all_backbones_stream_one_json_line_each(tmp_path):
    rows, log = _run(tmp_path, "--all", "--budget", "600")
    sys.path.insert(0, str(BENCH.parent))
    import extract_bench

    assert [r["backbone"] for r in rows] == extract_bench.DEFAULT + ["llama-8b"]
    assert "uce-4L" in extract_bench.DEFAULT and "scbert" in extract_bench.DEFAULT
    assert not [r for r in rows if "error" in r or "skipped" in r]
    assert "in a spawned process" in log
    for r in rows:
        assert r["cells"] > 0 and r["cells_per_s"] > 0
        assert set(r["stage_s_per_1k"]) == {"tokenise", "forward", "write"}
        assert r["stage_s_per_1k"]["write"] > 0
        if r["backbone"] not in ("hvg", "pca", "cellplm"):
            assert r["stage_s_per_1k"]["tokenise"] > 0 and r["stage_s_per_1k"]["forward"] > 0
            assert r["gflop_per_cell"] > 0 and r["tokens_median"] > 0


def test_a_spent_budget_skips_the_rest(tmp_path):
    rows, _ = _run(tmp_path, "--budget", "0", "--backbone", "hvg", "--backbone", "tgpt")
    assert [r["backbone"] for r in rows] == ["hvg", "tgpt"]
    assert all(r["skipped"].startswith("budget") for r in rows)
