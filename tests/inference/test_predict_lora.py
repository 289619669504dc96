"""``scdrugmap predict`` with a LoRA fine-tuning run: a new dataset embedded with each fold's stored
adapters and scored by its head, on real PC9 cells and a tiny random Geneformer-layout checkpoint."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extract"))

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import checkpoints as ck  # noqa: E402
from conftest import Cli, snapshot  # noqa: E402
from scdrugmap.inference.lora import fold_probabilities  # noqa: E402
from scdrugmap.probe.metrics import score  # noqa: E402
from scdrugmap.store.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory):
    """pc9a (fine-tuned on, pooled 5-fold LoRA run) and pc9b (new cells), 30 + 30 real PC9 cells each."""
    root = tmp_path_factory.mktemp("lora")
    cli = Cli()
    st, gf = ck.lora_base(root, cli)
    cli.ok("finetune", "--store", st, "--backbone", "geneformer", "--model-dir", gf, "--where",
           "dataset = 'pc9a'", "--epochs", "2", "--batch-size", "8", "--quiet")
    run = Store.open(st).sql("SELECT * FROM probe_runs WHERE method = 'lora'").iloc[0].to_dict()
    return st, gf, run


def test_each_fold_reproduces_its_stored_scores_and_new_cells_get_the_fold_mean(lora_store, cli, tmp_path):
    src, gf, run = lora_store
    st = tmp_path / "st"
    shutil.copytree(src, st)
    store = Store.open(st)
    # each fold's adapters + head, applied again to its own test cells, give exactly the stored scores
    cells = store.cells(datasets=["pc9a"])
    folds, facts = fold_probabilities(store, run, "pc9a", cells, gf, batch_size=8)
    assert facts["folds"] == folds.shape[0] == 5
    y = (cells["label"] == "resistant").to_numpy().astype(int)
    stored = store.sql("SELECT split, f1, auroc FROM probe_results WHERE run_id = ? ORDER BY split", [run["run_id"]])
    for k in range(5):
        test = np.load(st / "finetune" / run["run_id"] / f"fold-{k + 1}" / "split.npz")["test"]
        metrics = score(y[test], folds[k, test], positive=1)
        row = stored[stored["split"] == f"fold{k + 1}"].iloc[0]
        assert metrics["f1"] == pytest.approx(row["f1"], abs=1e-12)
        assert metrics["auroc"] == pytest.approx(row["auroc"], abs=1e-12, nan_ok=True)
    # the new dataset: the mean of the folds, stored per cell
    res = cli.ok("predict", "--store", st, "--model", run["run_id"], "--model-dir", gf, "--dataset", "pc9b",
                 "--batch-size", "8", "--quiet")
    assert "5 folds" in res.stderr
    new = store.cells(datasets=["pc9b"])
    expected = fold_probabilities(store, run, "pc9b", new, gf, batch_size=8)[0].mean(axis=0).astype(np.float32)
    got = store.sql('SELECT probability FROM predictions WHERE model = ? ORDER BY "row"', [run["run_id"]])
    assert np.array_equal(got["probability"].to_numpy(np.float32), expected)
    assert ((expected > 0) & (expected < 1)).all() and expected.std() > 0


def test_lora_refusals_leave_the_store_as_it_was(lora_store, cli, tmp_path):
    src, gf, run = lora_store
    st = tmp_path / "st"
    shutil.copytree(src, st)
    before = snapshot(st)
    args = ("predict", "--store", st, "--model", run["run_id"], "--dataset", "pc9b", "--quiet")
    cli.fails(*args, match="pass --model-dir")
    other = tmp_path / "gf-other"                       # the same layout, other weights
    shutil.copytree(gf, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    cli.fails(*args, "--model-dir", other, match="was fine-tuned from checkpoint")
    shutil.rmtree(st / "finetune" / run["run_id"] / "fold-2")
    cli.fails(*args, "--model-dir", gf, match="has 4 of its 5 folds")
    assert snapshot(st) == {k: v for k, v in before.items() if "/fold-2/" not in k}
