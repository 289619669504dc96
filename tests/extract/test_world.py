"""Extraction under torchrun: disjoint chunk shares, one commit by rank 0, same bytes as one process."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import snapshot
from scdrugmap.errors import UserError
from scdrugmap.extract.world import World
from scdrugmap.store.store import Store

pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints import save_geneformer, torchrun_extract, write_pc9_small  # noqa: E402


@pytest.mark.parametrize("size, n", [(1, 5), (2, 8), (3, 7), (4, 2), (8, 3)])
def test_shares_tile_the_chunks(size, n):
    shares = [list(World(rank, size).share(n)) for rank in range(size)]
    assert sum(shares, []) == list(range(n))                      # disjoint, complete, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1     # balanced


def test_world_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert (world.rank, world.size, world.main, world.device("cuda"), world.device("cpu")) == \
        (3, 4, False, "cuda:1", "cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="does not fit WORLD_SIZE=4"):
        World.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="not an integer"):
        World.from_env()


def test_two_processes_under_torchrun_match_one_process(cli, tmp_path):
    ckpt = save_geneformer(tmp_path / "gf", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=256)
    data = write_pc9_small(tmp_path / "pc9_small.h5ad", per_class=40)
    args = ["--backbone", "geneformer", "--model-dir", str(ckpt), "--chunk-rows", "10", "--batch-size", "4",
            "--quiet"]
    for name in ("one", "two"):
        cli.ok("ingest", data, "--store", tmp_path / name, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", tmp_path / "one", *args)

    run = torchrun_extract(tmp_path / "two", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    # 80 cells in 8 chunks of 10: each rank computed its own half, rank 0 committed
    assert "rank 1 of 2: geneformer · pc9: computed 4 chunks" in run.stderr
    assert "(2 processes; rank 0 computed 4 chunks)" in run.stdout
    assert run.stdout.count("80 cells x 64") == 1

    one, two = Store.open(tmp_path / "one"), Store.open(tmp_path / "two")
    X1, _ = one.load("geneformer")
    X2, _ = two.load("geneformer")
    assert np.array_equal(X1, X2)                 # same chunks, same batches: the same bytes
    p1, p2 = one.provenance("geneformer").iloc[0], two.provenance("geneformer").iloc[0]
    assert p1["params"] == p2["params"] and p1["checkpoint_sha256"] == p2["checkpoint_sha256"]
    assert not any((tmp_path / "two" / "embeddings.zarr" / "_staging").iterdir())

    # a rerun under torchrun skips the committed dataset and leaves the store as it was
    before = snapshot(tmp_path / "two")
    run = torchrun_extract(tmp_path / "two", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("already extracted") == 1
    assert snapshot(tmp_path / "two") == before
