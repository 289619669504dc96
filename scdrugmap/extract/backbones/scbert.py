"""``scbert``: scBERT (Yang et al. 2022, *Nature Machine Intelligence*), the pretrained Performer.

Written from the official code (github.com/TencentAILabHealthcare/scBERT: ``preprocess.py``,
``predict.py``, ``finetune.py``, ``performer_pytorch/performer_pytorch.py``); the encoder is the
shared :mod:`scdrugmap.extract.performer`. Each choice and its official source:

* **files**: ``--model-dir`` holds the pretrained checkpoint ``panglao_pretrain.pth`` (a
  ``torch.save`` dict whose ``model_state_dict`` ``predict.py``/``finetune.py`` load strictly;
  ``--option checkpoint=FILE``, default: the only ``*.pth`` in the folder) and the reference gene
  order: the ``var_names`` of the release's ``panglao_10000.h5ad`` (16,906 genes), given as that
  h5ad itself or as a text file with one symbol per line (``--option gene_list=FILE``, default:
  ``panglao_10000.h5ad`` or ``gene_list*.txt`` in ``--model-dir``). The gene2vec file
  ``gene2vec_16906.npy`` is not needed: the official ``Gene2VecPositionalEmbedding`` copies it
  (plus one zero row) into ``pos_emb.emb.weight``, which is in the checkpoint and overrides it.
  The checkpoint is read with ``weights_only`` (no pickled code) unless
  ``--option trust_checkpoint=true``.
* **sizes**: scBERT has no config file; ``PerformerLM(num_tokens=7, dim=200, depth=6,
  max_seq_len=16907, heads=10)`` with the defaults ``dim_head=64``, ``nb_features=266``,
  ``ff_mult=4`` is hard-coded in its scripts. Here the sizes are read from the checkpoint's
  shapes, then every key must be exactly the official one for those sizes (strict loading: a
  missing, unexpected or mis-sized weight is an error that names a few). The gene list must have
  ``pos_emb`` rows - 1 genes (the appended token has the last row).
* **genes** (``preprocess.py``): each reference gene takes the dataset column with exactly that
  symbol (case-sensitive, the first such column), absent genes are 0, other genes are dropped.
  A dataset with fewer than 5% of min(its genes, the reference genes) matched is refused.
* **values** (``preprocess.py``, ``predict.py``): ``normalize_total(target_sum=1e4)`` over the
  reference genes, ``log1p(base=2)`` (float32, as scanpy 1.7.2 of the official requirements),
  then ``x[x > 5] = 5`` and ``.long()``: the token is ``floor(min(log2(1 + x), num_tokens - 2))``,
  bins 0-5; the token ``0`` is appended (sequence length 16,907). The official
  ``sc.pp.filter_cells(min_genes=200)`` is a dataset filter that would drop cells: scdrugmap
  embeds every cell, so it is **not applied** (a cell with few genes gets an embedding too).
* **positions**: position ``p`` adds row ``p`` of the gene2vec table (``arange(n)``), float32 +=
  float64 in place as the official forward.
* **embedding**: scBERT defines no cell embedding (its classifier is a per-dataset conv + MLP head
  not in the checkpoint; ``attn_sum_save.py`` gives per-gene attention sums, not a vector). Ours:
  the mean over the 16,906 gene positions of the output after the final ``norm``
  (``return_encodings=True``), 200-d; the appended token is **excluded** (it carries no gene).
* **attention**: the official key-side maximum of the softmax kernel runs over the whole batch
  tensor, so a batched official run makes a cell depend slightly on its batch. ``predict.py``
  runs one cell per batch; here the maximum is taken per cell, which equals that one-cell run
  exactly for any batch size (see :mod:`..performer`). ``--option key_max=batch`` is the
  official batched computation (``finetune.py``'s batches, 3 cells by default): one maximum over
  each batch of ``--batch-size`` consecutive store cells. Every cell has the same length, so the
  engine adds no padding.
* **batch size**: 4 cells by default (16,907 tokens x 10 heads x 266 features is ~180 MB of
  float32 per cell and feature map). Cost: every cell is 16,907 tokens whatever its genes; with
  the release's sizes one cell took about 18 s on one CPU core (random weights, measured once),
  so use ``--device cuda`` for real datasets.

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations


import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, sha256_files
from ..performer import (LORA_ATTENTION, LORA_MLP, GeneMatch, PerformerBackbone, build_performer, check_state,
                         expression_bins, find_file, load_state, log2_normalised, model_folder, read_checkpoint,
                         read_gene_list, sizes_from_state)
from ..registry import Option, register

GENE_LIST_PATTERNS = ("panglao_10000.h5ad", "gene_list*.txt")
POOLING = "mean over the gene positions of the output after the final norm (appended token excluded)"
FIX = "use the released panglao_pretrain.pth (its model_state_dict)"


class ReferenceBinTokenizer(CellTokenizer):
    """One token per reference gene (its expression bin), then the appended 0."""

    def __init__(self, select: sp.csr_matrix, cap: int):
        self.select = select
        self.cap = cap
        self.n_genes = select.shape[1]

    def prepare(self, block):
        return log2_normalised(block, self.select)

    def tokens(self, values, i: int) -> np.ndarray:
        lo, hi = values.indptr[i], values.indptr[i + 1]
        ids = np.zeros(self.n_genes + 1, dtype=np.int64)
        ids[values.indices[lo:hi]] = expression_bins(values.data[lo:hi], self.cap)
        return ids

    def lengths(self, values) -> np.ndarray:
        return np.full(values.shape[0], self.n_genes + 1)


@register
class ScBERT(PerformerBackbone):
    name = "scbert"
    summary = "scBERT (Performer over 16,906 binned reference genes); mean of the gene outputs"
    default_dim = 200
    default_batch_size = 4
    requires = ("torch",)
    options = {
        **PerformerBackbone.options,
        "checkpoint": Option("", "checkpoint file (default: the only *.pth in --model-dir)"),
        "gene_list": Option("", "the reference gene order: panglao_10000.h5ad, or a text file with one symbol per "
                                "line (default: panglao_10000.h5ad or gene_list*.txt in --model-dir)"),
        "trust_checkpoint": Option(False, "unpickle the checkpoint fully (only for a file you trust)", bool),
    }

    # LoRA targets (``scdrugmap finetune``): the Performer's q, k, v, output and feed-forward
    # projections (not the masked-LM head ``to_out``, never run)
    lora_attention = LORA_ATTENTION
    lora_mlp = LORA_MLP

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        folder = model_folder(self.model_dir, "scBERT", "panglao_pretrain.pth")
        self.model_dir = folder
        self.ckpt_path = find_file(folder, self.config["checkpoint"], ("*.pth",), "scBERT checkpoint",
                                   "choose one with --option checkpoint=FILE (the release's is panglao_pretrain.pth)")
        self.gene_list_path = find_file(
            folder, self.config["gene_list"], GENE_LIST_PATTERNS, "scBERT gene list",
            "pass --option gene_list=FILE: the release's panglao_10000.h5ad, or a text file of its var_names "
            "(one per line, in order)")
        self.genes = read_gene_list(self.gene_list_path)
        state = read_checkpoint(self.ckpt_path, "scBERT", trusted=self.config["trust_checkpoint"])
        self.sizes = sizes_from_state(state, self.ckpt_path, "scBERT")
        if self.sizes.num_tokens < 3:
            raise UserError(f"{self.ckpt_path.name}: token_emb has {self.sizes.num_tokens} rows; scBERT has bins "
                            "0..num_tokens-2 plus a mask token")
        model = build_performer(self.sizes)
        check_state(state, model, self.ckpt_path, FIX)
        if self.sizes.pos_rows != len(self.genes) + 1:
            raise UserError(f"the gene list {self.gene_list_path.name} has {len(self.genes)} genes but the "
                            f"checkpoint's positional table has {self.sizes.pos_rows} rows (genes + 1): use the gene "
                            "list of this checkpoint (the var_names of panglao_10000.h5ad, 16,906 genes)")
        load_state(model, state)
        self.model = model.to(self.device).eval()
        self.cap = self.sizes.num_tokens - 2               # CLASS - 2
        self._matched: dict = {}

    @property
    def dim(self) -> int:
        return self.sizes.dim

    def checkpoint_sha256(self) -> str:
        return sha256_files([self.ckpt_path])

    def matching(self, source) -> GeneMatch:
        if source.name not in self._matched:
            self._matched[source.name] = GeneMatch.build(source.symbols(upper=False), self.genes, source.name, "scBERT")
        return self._matched[source.name]

    def cell_tokenizer(self, source) -> ReferenceBinTokenizer:
        return ReferenceBinTokenizer(self.matching(source).select, self.cap)

    def pool(self, input_ids, attention_mask):
        import torch

        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.model(input_ids, positions, attention_mask, None, self.key_max)
        return hidden[:, :len(self.genes)].float().mean(1)

    def dataset_params(self, source) -> dict:
        m = self.matching(source)
        return {"genes_matched": m.matched, "dataset_genes": m.source_genes}

    def params(self) -> dict:
        return {**super().params(), "checkpoint": self.ckpt_path.name, "gene_list": self.gene_list_path.name,
                "gene_list_sha256": sha256_files([self.gene_list_path]), "reference_genes": len(self.genes),
                **{f"model_{k}": v for k, v in self.sizes.as_dict().items()},
                "gene_match": "exact symbol, first source column; absent genes 0",
                "values": "normalize_total 1e4 over the reference genes, log2(1+x), float32 (scanpy 1.7.2)",
                "binning": f"floor(min(x, {self.cap})); token 0 appended", "cells_filtered": "none (official "
                "filter_cells(min_genes=200) not applied)", "pooling": POOLING,
                **self.key_max_params("per cell (= the official one-cell-per-batch predict.py)"),
                "attention_precision": "fp32"}
