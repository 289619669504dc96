"""Prompt building, top-gene ranking and answer parsing (no server, no data)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scdrugmap.zeroshot.cache import cache_key
from scdrugmap.zeroshot.prompt import Context, build_messages, messages_json, parse_answer, top_genes


def csr(rows, dtype=np.float32):
    return sp.csr_matrix(np.asarray(rows, dtype=dtype))


SYMBOLS = np.array(["A", "B", "C", "D", "E", "F"])


def test_top_genes_rank_by_value_ties_in_column_order_zeros_never_listed():
    block = csr([[0, 5, 2, 5, 0, 1],
                 [0, 0, 0, 0, 0, 0],
                 [3, 3, 3, 0, 0, 0]])
    assert top_genes(block, 0, SYMBOLS, 3) == ["B", "D", "C"]
    assert top_genes(block, 0, SYMBOLS, 10) == ["B", "D", "C", "F"]    # never an unexpressed gene
    assert top_genes(block, 1, SYMBOLS, 3) == []
    assert top_genes(block, 2, SYMBOLS, 2) == ["A", "B"]


def test_top_genes_unsorted_indices_explicit_zeros_and_unsigned_counts():
    # CSR with unsorted column indices and a stored zero, in an unsigned dtype
    block = sp.csr_matrix((np.array([1, 0, 7, 1], dtype=np.uint16), np.array([5, 0, 2, 1]), np.array([0, 4])),
                          shape=(1, 6))
    assert top_genes(block, 0, SYMBOLS, 4) == ["C", "B", "F"]


def test_prompt_holds_context_cells_and_format():
    context = Context("pc9", drug="erlotinib", cancer_type="Lung cancer", tissue=None)
    [message] = build_messages(context, [["EGFR", "KRT18"], [], ["MALAT1"]], top_n=10)
    text = message["content"]
    assert message["role"] == "user"
    assert "Dataset: pc9" in text and "Drug: erlotinib" in text and "Cancer type: Lung cancer" in text
    assert "Tissue" not in text                                          # unknown: not said
    assert "Cell 1: EGFR, KRT18\nCell 2: (no genes detected)\nCell 3: MALAT1" in text
    assert "10 most highly expressed genes" in text
    assert "for all 3 cells" in text and "{res:" in text and "1 for a sensitive cell and 0 for a resistant" in text


def test_cache_key_depends_on_model_and_exact_prompt():
    prompt = messages_json(build_messages(Context("d"), [["A"]], 10))
    other = messages_json(build_messages(Context("d"), [["B"]], 10))
    assert cache_key("m", prompt) == cache_key("m", prompt)
    assert len({cache_key("m", prompt), cache_key("n", prompt), cache_key("m", other)}) == 3


@pytest.mark.parametrize("text, n, expected", [
    ("{res:1,0,1}", 3, [1, 0, 1]),
    ("Here you go: {res: 1, 0 ,1 }.", 3, [1, 0, 1]),
    ("{RES:0,0}", 2, [0, 0]),
    ("first {res:1,1,1} then, on reflection, {res:0,1,0}", 3, [0, 1, 0]),      # the last one counts
    ("{res:1,0}", 3, None),                                                       # too few
    ("{res:1,0,1,1}", 3, None),                                                   # too many
    ("{res:1,2,0}", 3, None),                                                     # not 0/1
    ("{res:[1,0,1]}", 3, None),
    ("{res:}", 0, None),
    ("1,0,1", 3, None),
    ("I cannot tell from gene lists.", 3, None),
    ("", 3, None),
    (None, 3, None),
])
def test_parse_answer(text, n, expected):
    assert parse_answer(text, n) == expected
