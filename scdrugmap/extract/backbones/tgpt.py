"""``tgpt``: tGPT (Shen et al. 2023, iScience), a GPT-2 over cells' ranked gene symbols.

Follows the official release (github.com/deeplearningplus/tGPT, README "Extract features",
and the hub checkpoint ``lixiangchun/transcriptome-gpt-1024-8-16-64``):

* checkpoint: ``config.json`` + weights of ``GPT2LMHeadModel`` and the release's word-level
  tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) in one
  directory; the tokenizer's template adds the start token ``</b>`` and the end token ``</s>``;
* input: the cell's gene symbols ranked by expression, highest first, with the official clean-up
  (``-`` and ``.`` become ``_``), cut to ``max_length`` (64) tokens, i.e. 62 genes. The release
  does not publish how its rankings were made; here raw counts are ranked (any per-cell
  normalisation gives the same order), ties in source gene order, and genes absent from the
  vocabulary (e.g. mitochondrial genes, which it lacks) are skipped rather than becoming
  ``<unk>``;
* token type 0 at every position: the official ``train.py`` and README pass the tokenizer's whole
  output to the model (``model(**batch)``), and with the transformers 4.x of the release the
  tokenizer returns ``token_type_ids`` (all 0; its ``model_input_names`` default), which GPT-2
  embeds with its word embedding: every input position gets ``wte[0]`` (the ``<pad>`` row) added.
  The released weights were trained that way, so scdrugmap passes them explicitly (transformers
  5 tokenizers no longer return them, and the README run there would leave them out);
* embedding: mean of the last hidden state over the gene tokens (``</b>``, ``</s>`` and padding
  excluded), as the official README does.
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import (CellTokenizer, TorchBackbone, load_strict, masked_mean, resolve_model_dir, sha256_files,
                      weights_file, without_ends)
from ..registry import Option, register

TOKENIZER_FILES = ("tokenizer.json",)


def clean_symbol(symbol: str) -> str:
    """The official clean-up: the tokenizer's whitespace pre-tokenizer would split on '-' and '.'."""
    return re.sub(r"[-.]", "_", symbol)


class RankedSymbolTokenizer(CellTokenizer):
    """Top genes by count, as vocabulary ids between the start and end tokens."""

    def __init__(self, cols: np.ndarray, ids: np.ndarray, n_genes: int, bos_id: int, eos_id: int):
        self.cols, self.ids = cols, ids           # source columns in the vocabulary, and their ids
        self.n_genes, self.bos_id, self.eos_id = n_genes, bos_id, eos_id

    def prepare(self, block):
        values = sp.csr_matrix(sp.csr_matrix(block)[:, self.cols], dtype=np.float64)
        values.eliminate_zeros()
        return values

    def tokens(self, values, i: int) -> np.ndarray:
        lo, hi = values.indptr[i], values.indptr[i + 1]
        genes, v = values.indices[lo:hi], values.data[lo:hi]
        order = np.lexsort((genes, -v))[: self.n_genes]
        return np.concatenate([[self.bos_id], self.ids[genes[order]], [self.eos_id]])

    def lengths(self, values) -> np.ndarray:
        return np.minimum(np.diff(values.indptr), self.n_genes) + 2


@register
class TGPT(TorchBackbone):
    name = "tgpt"
    summary = "tGPT (GPT-2 over ranked gene symbols); mean of the last layer over gene tokens"
    default_dim = 1024
    options = {**TorchBackbone.options,
               "max_length": Option(64, "tokens per cell, start and end tokens included", int, min=3)}

    # LoRA targets (``scdrugmap finetune``): GPT-2's packed q/k/v and output projections (Conv1D),
    # its feed-forward layers
    lora_attention = (r"attn\.c_attn", r"attn\.c_proj")
    lora_mlp = (r"mlp\.c_fc", r"mlp\.c_proj")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoConfig, GPT2LMHeadModel, PreTrainedTokenizerFast

        self.model_dir = resolve_model_dir(self.model_dir)
        for name in ("config.json", *TOKENIZER_FILES):
            if not (self.model_dir / name).is_file():
                raise UserError(f"{self.model_dir} has no {name}: tGPT needs the release's config and tokenizer files")
        cfg = AutoConfig.from_pretrained(self.model_dir)
        if cfg.model_type != "gpt2":
            raise UserError(f"{self.model_dir} holds a {cfg.model_type!r} model, not tGPT (GPT-2): check --model-dir")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self.model_dir)
        self.vocab = self.tokenizer.get_vocab()
        if cfg.vocab_size != len(self.vocab):
            raise UserError(f"config vocab_size {cfg.vocab_size} does not match the tokenizer's {len(self.vocab)} "
                            "tokens: use the tokenizer released with this model")
        for token in ("</b>", "</s>", "<pad>"):
            if token not in self.vocab:
                raise UserError(f"the tokenizer in {self.model_dir} has no {token} token: not the tGPT tokenizer")
        if not 3 <= self.config["max_length"] <= cfg.n_positions:
            raise UserError(f"--option max_length must be between 3 and {cfg.n_positions}")
        self.pad_id = self.vocab["<pad>"]
        self.weights = weights_file(self.model_dir)
        self.model = load_strict(GPT2LMHeadModel, self.model_dir, "tGPT").transformer.to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.n_embd)

    def checkpoint_sha256(self) -> str:
        return sha256_files([self.model_dir / "config.json", self.weights, self.model_dir / "tokenizer.json"])

    def matching(self, source):
        symbols = [clean_symbol(s) for s in source.symbols(upper=False)]
        cols = np.array([c for c, s in enumerate(symbols) if s in self.vocab], dtype=np.int64)
        if len(cols) == 0:
            raise UserError(f"dataset {source.name!r}: none of its {len(symbols)} gene symbols is in the tGPT "
                            "vocabulary: check that var holds human gene symbols (or --symbol-col at ingest)")
        return cols, np.array([self.vocab[symbols[c]] for c in cols], dtype=np.int64)

    def cell_tokenizer(self, source) -> RankedSymbolTokenizer:
        cols, ids = self.matching(source)
        return RankedSymbolTokenizer(cols, ids, self.config["max_length"] - 2, self.vocab["</b>"], self.vocab["</s>"])

    def pool(self, input_ids, attention_mask):
        # token type 0 everywhere: GPT-2 adds wte[token type], i.e. the <pad> row, to every input
        # position, as in the official training and README (see the module docstring)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=input_ids.new_zeros(input_ids.shape)).last_hidden_state
        return masked_mean(hidden, without_ends(attention_mask))   # gene tokens: not </b>, </s>

    def dataset_params(self, source) -> dict:
        return {"genes_in_vocabulary": int(len(self.matching(source)[0]))}

    def params(self) -> dict:
        return {**super().params(), "max_length": self.config["max_length"],
                "ranking": "raw counts, descending; ties in source gene order; out-of-vocabulary genes skipped",
                "symbol_cleanup": "'-' and '.' -> '_'", "token_type_ids": "0 at every position (wte[0] added)",
                "pooling": "mean of last hidden state over gene tokens"}
