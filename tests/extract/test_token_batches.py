"""The engine's batched tokenisation (``TorchBackbone.token_batches``: ``tokens_many`` per batch,
padded from the ragged tokens) gives exactly the padded batches of the straightforward per-cell
path (``tokens`` of each cell, collated one by one), for every token-based backbone, on real PC9
cells with the release's token settings (gene lists, vocabularies, sequence limits)."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoints as ck

pytest.importorskip("torch")


def _pc9_genes(n: int) -> list:
    import anndata as ad

    return list(ad.read_h5ad(ck.PC9, backed="r").var_names.astype(str)[:n])


def _build(name: str, folder):
    if name == "geneformer":
        return ck.save_geneformer(folder, "config_6L.json", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    if name == "geneformer-v2":
        return ck.save_geneformer(folder, "config_6L.json", v2=True, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    if name == "tgpt":
        return ck.save_tgpt(folder, n_embd=32, n_layer=1, n_head=2)
    if name == "scgpt":
        from official_scgpt import save_official_scgpt

        return save_official_scgpt(folder, embsize=32, nlayers=1, nheads=2, d_hid=64)
    if name == "scfoundation":
        from official_scfoundation import save_scfoundation

        return save_scfoundation(folder)
    if name == "uce":
        from official_uce import write_model_files

        return write_model_files(folder, _pc9_genes(25077), all_tokens=False)
    if name == "scbert":
        from official_performer import save_scbert

        return save_scbert(folder, _pc9_genes(16906))
    if name == "celllm":
        from official_performer import save_celllm

        return save_celllm(folder, _pc9_genes(19379), max_seq_len=6000)
    return ck.minilm_dir()


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory):
    """Every third real PC9 cell (502 cells, both response classes) in a store."""
    from scdrugmap.store.ingest import IngestRequest, ingest
    from scdrugmap.store.store import Store

    folder = tmp_path_factory.mktemp("pc9")
    path, _ = ck.write_pc9_every(folder, step=3, start=0)
    ingest(folder / "store", IngestRequest(file=path, dataset="pc9", label_col="response"))
    return Store.open(folder / "store")


@pytest.mark.parametrize("name,backbone,batch_size", [
    ("geneformer", "geneformer", 32), ("geneformer-v2", "geneformer", 32), ("tgpt", "tgpt", 32),
    ("scgpt", "scgpt", 32), ("scfoundation", "scfoundation", 16), ("uce", "uce", 25), ("scbert", "scbert", 4),
    ("celllm", "celllm", 8), ("llm", "llm", 16)])
def test_batched_tokens_equal_the_per_cell_reference(pc9_store, tmp_path, name, backbone, batch_size):
    from scdrugmap.extract import registry
    from scdrugmap.extract.engine import _CellTokens, _Pad
    from scdrugmap.extract.runner import _sources

    model_dir = _build(name, tmp_path / name)
    model = registry.get(backbone)(model_dir=model_dir, device="cpu", batch_size=batch_size,
                                   options={"top_k": 100} if backbone == "llm" else {})
    (source,) = _sources(pc9_store, ["pc9"])
    model.prepare(pc9_store, [source])
    tokenizer = model.cell_tokenizer(source)
    block = source.rows(0, 160 if backbone == "scbert" else source.n_cells)

    batched = list(model.token_batches(block, tokenizer))
    cells = _CellTokens(block, tokenizer)
    batches = model.batches(cells.lengths())
    pad = _Pad(model.pad_id, model.pad_values)
    assert len(batched) == len(batches) > 1
    seen = 0
    for (index, ids, mask, inputs), rows in zip(batched, batches):
        r_index, r_ids, r_mask, r_inputs = pad([cells[i] for i in rows])
        assert index.tolist() == r_index.tolist() == list(rows)
        assert ids.dtype == r_ids.dtype and mask.dtype == r_mask.dtype
        assert np.array_equal(ids.numpy(), r_ids.numpy())
        assert np.array_equal(mask.numpy(), r_mask.numpy())
        assert sorted(inputs) == sorted(r_inputs) == sorted(model.pad_values)
        for k in inputs:
            assert inputs[k].dtype == r_inputs[k].dtype
            assert np.array_equal(inputs[k].numpy(), r_inputs[k].numpy())
        seen += int(mask.sum())
    assert seen > block.shape[0]        # real tokens were compared, not empty batches
