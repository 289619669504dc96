"""tGPT against a minimal re-statement of the official feature extraction.

Written from the official repository (deeplearningplus/tGPT, commit 9714a98), importing nothing
of scdrugmap's preprocessing:

* README "Extract features" (the same code as ``example.ipynb``): ``LineDataset`` replaces ``-``
  and ``.`` by ``_`` in each line (``re.compile(r'\\-|\\.')``); ``DataLoader(batch_size=64)``;
  ``tokenizer(lines, max_length=64, truncation=True, padding=True, return_tensors="pt")`` with the
  release's ``PreTrainedTokenizerFast``; ``GPT2LMHeadModel.from_pretrained(checkpoint,
  output_hidden_states=True).transformer`` in eval mode, called as ``model(**batch)``; the cell's
  feature is ``last_hidden_state[j, 1:eos].mean(0)`` with ``eos = attention_mask.sum(1) - 1``;
* ``model(**batch)`` passes all the tokenizer returns. With transformers 4.x, which the release was
  trained (``train.py``: ``GeneRankingDataset`` returns the tokenizer's output, collated by
  ``DataCollatorForLanguageModeling``, then ``model(**batch)``) and run with, that includes
  ``token_type_ids`` (``PreTrainedTokenizerBase.model_input_names`` held them by default), all 0,
  which GPT-2 embeds with its word embedding. transformers 5 no longer returns them by default,
  so the re-statement asks for them (``return_token_type_ids=True``);
* the lines: "gene symbols ranked by expression". The release does not say how its rankings were
  made; its own rankings (``data/val.txt``: 100 cells of 62 symbols) hold vocabulary genes only,
  none of them mitochondrial. The re-statement writes each cell's nonzero genes in the vocabulary,
  highest raw count first, ties in source order (Python's stable ``sorted``), the whole line, and
  lets the tokenizer cut it at 64 tokens.

Both sides run the same random GPT-2 saved beside the release's tokenizer on the same real PC9
cells; the features agree to a centred cosine of 0.9999 per cell (centred on each side by the
mean over cells).
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from checkpoints import centred_cosines, save_tgpt, write_pc9_small

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scdrugmap.store.store import Store  # noqa: E402


def ranked_lines(adata: ad.AnnData, vocab: dict) -> list[str]:
    """Each cell's vocabulary genes with a count, highest first, as one line of symbols."""
    symbols = [str(s) for s in adata.var_names]
    regex = re.compile(r"\-|\.")
    counts = sp.csr_matrix(adata.X)
    lines = []
    for i in range(counts.shape[0]):
        row = counts[i]
        genes = [(int(c), float(v)) for c, v in zip(row.indices, row.data)
                 if v > 0 and regex.sub("_", symbols[c]) in vocab]
        genes = sorted(genes, key=lambda cv: -cv[1])
        lines.append(" ".join(symbols[c] for c, _ in genes))
    return lines


def official_features(folder, lines: list[str], max_len: int = 64, batch_size: int = 64) -> np.ndarray:
    regex = re.compile(r"\-|\.")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, output_hidden_states=True).transformer
    model.eval()
    ds = [regex.sub("_", line) for line in lines]
    features = []
    for lo in range(0, len(ds), batch_size):
        batch = tokenizer(ds[lo:lo + batch_size], max_length=max_len, truncation=True, padding=True,
                          return_tensors="pt", return_token_type_ids=True)
        with torch.no_grad():
            x = model(**batch)
        eos_idxs = batch["attention_mask"].sum(dim=1) - 1
        for j, item in enumerate(x.last_hidden_state):
            features.append(item[1:int(eos_idxs[j]), :].mean(dim=0).numpy())
    return np.stack(features)


def test_matches_official_feature_extraction(cli, tmp_path):
    data = write_pc9_small(tmp_path / "pc9_small.h5ad", per_class=20)
    checkpoint = save_tgpt(tmp_path / "tgpt", n_embd=64, n_layer=2, n_head=4)
    st = tmp_path / "st"
    cli.ok("ingest", data, "--store", st, "--dataset", "pc9", "--label-col", "response")
    cli.ok("extract", "--store", st, "--backbone", "tgpt", "--model-dir", checkpoint, "--dtype", "float32",
           "--quiet")
    ours, _ = Store.open(st).load("tgpt", dtype=np.float32)

    adata = ad.read_h5ad(data)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(checkpoint)
    lines = ranked_lines(adata, tokenizer.get_vocab())
    assert min(len(line.split()) for line in lines) > 62           # every line is cut at 64 tokens
    official = official_features(checkpoint, lines)
    cos = centred_cosines(ours, official)
    print(f"tgpt: min centred cosine {cos.min():.7f} over {len(cos)} cells")
    assert cos.min() >= 0.9999, np.sort(cos)[:5]
    # the token type matters: without it (a transformers 5 run of the README) the features differ
    model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).transformer.eval()
    batch = tokenizer([re.sub(r"[-.]", "_", line) for line in lines[:4]], max_length=64, truncation=True,
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    plain = plain[:, 1:-1].mean(1).numpy()
    assert np.abs(plain - official[:4]).max() > 1e-2
