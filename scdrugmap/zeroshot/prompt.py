"""Prompts that ask a chat model for drug-response calls, and parsing of its answers.

The structure follows scDrugMap's ``code/GPT4/main.py`` (arXiv 2505.05612), which evaluated
GPT-4o-mini zero-shot: one user message per batch of cells with instructions, the data
source, each cell's highest-expressed gene symbols and the answer format ``{res:1,0,...}``
(1 = sensitive, 0 = resistant), read back with the pattern ``\\{res:([0-1,]+)\\}``; an answer
without exactly one prediction per cell is not used. What differs, and why:

* the wording is our own, and the context names the drug, cancer type and tissue (from the
  store's ``datasets`` table, when known) besides the dataset: "sensitivity to drugs" alone
  leaves the model to guess which drug;
* each cell is one numbered line (``Cell 3: EEF1A1, TPT1, ...``, highest first) instead of
  a printed Python list of lists, so that a cell's genes cannot be mistaken for another's;
* the format is stated once with the exact number of cells of this request (the last
  batch of a dataset may be shorter), instead of a 10-cell example repeated three times;
  the example has a different length on purpose so that it cannot be copied as an answer;
* parsing accepts spaces (``{res: 1, 0}``) and takes the *last* ``{res:...}`` of the
  answer, so that a model that reasons before answering is read at its conclusion.

Cells are never named in a prompt: obs names such as ``control:ACGT...`` can give away the
label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

# Bumped whenever the wording changes: recorded with every run, and part of every cache key
# through the prompt text itself.
PROMPT_VERSION = 1

_ANSWER = re.compile(r"\{\s*res\s*:\s*([^{}]*?)\s*\}", re.IGNORECASE)
_DIGITS = re.compile(r"^[01](\s*,\s*[01])*$")


@dataclass(frozen=True)
class Context:
    """What the prompt says about where the cells come from (None: not known, not said)."""

    dataset: str
    drug: str | None = None
    cancer_type: str | None = None
    tissue: str | None = None


def top_genes(block, i: int, symbols, n: int) -> list[str]:
    """Symbols of the ``n`` highest raw values of row ``i`` of a CSR ``block``, highest first.

    Ties keep column (source gene) order; zero values are never listed, so a cell with few
    detected genes gets a shorter list rather than arbitrary unexpressed genes.
    """
    lo, hi = block.indptr[i], block.indptr[i + 1]
    cols = np.asarray(block.indices[lo:hi])
    vals = np.asarray(block.data[lo:hi], dtype=np.float64)   # float: negating unsigned counts wraps
    keep = vals > 0
    cols, vals = cols[keep], vals[keep]
    order = np.lexsort((cols, -vals))[:n]
    return [str(symbols[c]) for c in cols[order]]


def build_messages(context: Context, gene_lists: list[list[str]], top_n: int) -> list[dict]:
    """The chat messages of one request: a single user message, as in scDrugMap."""
    k = len(gene_lists)
    about = [("Dataset", context.dataset), ("Drug", context.drug), ("Cancer type", context.cancer_type),
             ("Tissue", context.tissue)]
    lines = [
        "You are given single cells from a drug-response experiment. Using what you know about gene "
        "expression, cancer biology and drug resistance, decide for each cell whether it is sensitive "
        "or resistant to the drug.",
        "",
        "Where the cells come from:",
        *(f"{name}: {value}" for name, value in about if value),
        "",
        f"For each cell you get its {top_n} most highly expressed genes (fewer if fewer were "
        "detected), highest first. One cell per line:",
        *(f"Cell {j}: {', '.join(genes) if genes else '(no genes detected)'}"
          for j, genes in enumerate(gene_lists, start=1)),
        "",
        f"Answer 1 for a sensitive cell and 0 for a resistant cell, for all {k} cells in the order "
        f"given, as {k} digits separated by commas inside {{res:...}}. For example, for 3 cells: "
        "{res:0,1,1}. Reply with the {res:...} line only.",
    ]
    return [{"role": "user", "content": "\n".join(lines)}]


def messages_json(messages: list[dict]) -> str:
    """The exact, canonical text of the messages: what the cache stores and keys on."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def parse_answer(text: str | None, n_cells: int) -> list[int] | None:
    """The 0/1 predictions in ``text``'s last ``{res:...}``; None unless exactly ``n_cells``."""
    if not text:
        return None
    matches = _ANSWER.findall(text)
    if not matches or not _DIGITS.match(matches[-1]):
        return None
    values = [int(v) for v in matches[-1].split(",")]
    return values if len(values) == n_cells else None


def estimate_tokens(prompt_chars: int, n_requests: int, n_cells: int) -> int:
    """A rough token count (about 4 characters a token, plus the short answers) for the cost guard."""
    return prompt_chars // 4 + n_requests * 10 + n_cells * 2
