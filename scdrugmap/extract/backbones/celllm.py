"""``celllm``: cellLM (Zhao et al. 2023, "Large-Scale Cell Representation Learning via
Divide-and-Conquer Contrastive Learning"), the pretrained Performer released with OpenBioMed.

Written from the official code (github.com/PharMolix/OpenBioMed:
``open_biomed/models/cell/performer_celllm.py::PerformerLM_CellLM``,
``open_biomed/models/task_model/ctc_model.py::CTCModel``, ``configs/ctc/cellLM.json``,
``open_biomed/feature/cell_featurizer.py``); the encoder is the shared
:mod:`scdrugmap.extract.performer`. Each choice and its official source:

* **files**: ``--model-dir`` holds the config ``cellLM.json`` (OpenBioMed's ``configs/ctc/``;
  any ``cellLM*.json``, or ``--option config=FILE``), the checkpoint ``checkpoint4_fixed.pth``
  (the file name of the config's ``ckpt_path``, else the only ``*.pth``; ``--option
  checkpoint=FILE``), a ``torch.save`` dict whose ``model_state_dict`` (the config's
  ``param_key``) ``CTCModel`` loads strictly, and the gene list (below). The gene2vec file
  ``gene2vec_19379_512.npy`` is not needed: ``Gene2VecPositionalEmbedding`` copies it, plus a
  ones row (CLS) and a zeros row (PAD), into ``pos_emb.emb.weight``, which the checkpoint
  overrides. The checkpoint is read with ``weights_only`` unless ``--option trust_checkpoint=true``.
* **sizes** (``network.structure`` of the config): ``num_tokens`` 8, ``dim`` 512, ``depth`` 10,
  ``heads`` 16, ``gene_num`` 19,379, ``max_seq_len`` 6,000; constructor defaults for the rest
  (``dim_head`` 64, ``nb_features`` 266, ``ff_mult`` 4). Configurations that change the math
  (local attention, generalized attention, causal, GLU, ScaleNorm/ReZero, tied embeddings, qkv
  bias, no gene2vec table) are refused. Loading is strict: a missing, unexpected or mis-sized
  weight is an error that names a few.
* **gene list**: the model reads a vector of ``gene_num`` values in a fixed gene order, and that
  19,379-gene list is **not published** in the OpenBioMed repository. scdrugmap therefore requires
  it from the user: ``--option gene_list=FILE`` (one symbol per line, in the model's order; or an
  ``.h5ad`` whose ``var_names`` are that order), or a ``gene_list*.txt`` in ``--model-dir``; its
  length must be ``gene_num``. Source genes are matched by exact symbol (first column), absent
  genes are 0; fewer than 5% of min(dataset genes, model genes) matched is refused.
* **values**: OpenBioMed reads ``.h5ad`` values as they are (``CellFullseqFeaturizer``); how its
  data were normalised is not in the repository. The clip-at-5-and-floor binning is scBERT's,
  so scdrugmap applies scBERT's preprocessing (**our inference, not an official statement**):
  ``normalize_total(1e4)`` over the model's genes, ``log1p(base=2)`` (float32, scanpy 1.7.2),
  then ``floor(min(x, num_tokens - 3))`` (``exp[exp > cls_token_id - 1] = cls_token_id - 1;
  exp.long()``), bins 0-5.
* **one cell** (``PerformerLM_CellLM.forward``): the **nonzero** genes only, in gene-list order,
  after a CLS token (token ``num_tokens - 2`` at positional row ``gene_num``, the ones row); a
  cell with more than ``max_seq_len - 1`` nonzero genes keeps those with the lowest gene-list
  indices (the official ``[:max_seq_len]``). No cell is dropped.
* **padding** (official quirk, reproduced): every cell is padded to ``max_seq_len`` with PAD
  tokens (token ``num_tokens - 1``, positional row ``gene_num + 1``, zeros) and the mask only
  zeroes ``v``: padded keys still enter the key sums and the key maximum, so a cell's output
  depends on ``max_seq_len``, not on its batch. All padding positions of a cell carry the same
  hidden state through every layer (same input, same global sums), so scdrugmap computes one
  PAD position with key weight ``max_seq_len - L`` (:mod:`..performer`) instead of
  ``max_seq_len - L`` copies: the same sums, at the cost of the cell's own length (with the
  release's sizes a cell of 1,400 genes took about 2.5 s on one CPU core, random weights).
* **attention**: by default the key maximum per cell (official: per batch tensor; equal for one
  cell per batch), so an embedding does not depend on its batch. ``--option key_max=batch`` is
  the official batched computation: one maximum over each batch of ``--batch-size`` consecutive
  store cells, the batches of an official run over the dataset in order (``ctc.py`` evaluates
  with ``DataLoader(batch_size=3 by default, shuffle=False)``; its training script passes 32).
  Each cell's PAD key (standing for the official padding, whose keys count) is in that maximum;
  the engine's own right padding is not. How far it moves embeddings: :mod:`..performer`.
* **embedding**: OpenBioMed defines no cell embedding from the pretrained encoder (its CTC head
  scatters a per-gene conv scalar into a 19,380-vector and trains an MLP; not in the checkpoint).
  Ours: the output at the CLS position after the final ``norm`` (``return_encodings=True``,
  position 0), 512-d.

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, sha256_files
from ..performer import (LORA_ATTENTION, LORA_MLP, GeneMatch, PerformerBackbone, PerformerSizes, build_performer,
                         check_state, default_nb_features, expression_bins, find_file, load_state, log2_normalised,
                         model_folder, read_checkpoint, read_gene_list)
from ..registry import Option, register

NO_GENE_LIST = ("cellLM's gene order (gene_num genes) is not published with OpenBioMed: pass --option gene_list=FILE "
                "with one symbol per line in the model's gene order (or put gene_list.txt in --model-dir)")
# PerformerLM_CellLM arguments that would change the computation, with their official defaults
FIXED = {"local_attn_heads": 0, "causal": False, "generalized_attention": False, "no_projection": False,
         "ff_glu": False, "use_scalenorm": False, "use_rezero": False, "tie_embed": False, "qkv_bias": False,
         "g2v_position_emb": True, "cross_attend": False}


@dataclass(frozen=True)
class CellLMConfig:
    sizes: PerformerSizes
    gene_num: int
    max_seq_len: int
    param_key: str
    ckpt_name: str

    @classmethod
    def read(cls, path: Path) -> "CellLMConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the cellLM config {path}: {type(e).__name__}") from None
        s = raw.get("network", {}).get("structure", raw) if isinstance(raw, dict) else None
        if not isinstance(s, dict) or s.get("name", "celllm") != "celllm":
            name = s.get("name") if isinstance(s, dict) else None
            raise UserError(f"{path.name} is not a cellLM config (network.structure.name is {name!r}, expected "
                            "'celllm'): use OpenBioMed's configs/ctc/cellLM.json")
        need = ("num_tokens", "dim", "depth", "heads", "max_seq_len", "gene_num")
        missing = [k for k in need if k not in s]
        if missing:
            raise UserError(f"{path.name} lacks {', '.join(missing)} in network.structure: use OpenBioMed's "
                            "configs/ctc/cellLM.json")
        changed = [f"{k}={s[k]!r}" for k, v in FIXED.items() if k in s and s[k] not in (v, [v])]
        if changed:
            raise UserError(f"{path.name}: {', '.join(changed)} is not supported (the release uses the "
                            "PerformerLM defaults)")
        try:
            dim_head = int(s.get("dim_head", 64))
            num_tokens, dim = int(s["num_tokens"]), int(s["dim"])
            sizes = PerformerSizes(num_tokens=num_tokens, dim=dim, depth=int(s["depth"]), heads=int(s["heads"]),
                                   dim_head=dim_head,
                                   nb_features=int(s.get("nb_features") or default_nb_features(dim_head)),
                                   ff_hidden=dim * int(s.get("ff_mult", 4)), pos_rows=int(s["gene_num"]) + 2)
            max_seq_len = int(s["max_seq_len"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{path.name}: a size is not a number ({e})") from None
        if num_tokens < 4 or max_seq_len < 2 or min(sizes.dim, sizes.depth, sizes.heads, dim_head) < 1:
            raise UserError(f"{path.name}: num_tokens must be at least 4 (bins, CLS, PAD) and max_seq_len at least 2")
        return cls(sizes, int(s["gene_num"]), max_seq_len, str(s.get("param_key", "model_state_dict")),
                   Path(str(s.get("ckpt_path") or "")).name)


class NonzeroGeneTokenizer(CellTokenizer):
    """CLS, then the nonzero genes' bins in gene-list order (truncated), then one PAD position
    standing for all the official padding (its key weight = their number)."""

    def __init__(self, select: sp.csr_matrix, cap: int, cls_token: int, pad_token: int, max_seq_len: int):
        self.select = select
        self.cap = cap
        self.cls_token, self.pad_token = cls_token, pad_token
        self.cls_gene, self.pad_gene = select.shape[1], select.shape[1] + 1
        self.max_seq_len = max_seq_len

    def prepare(self, block):
        return log2_normalised(block, self.select)          # indices sorted: gene-list order

    def tokens(self, values, i: int) -> dict:
        lo, hi = values.indptr[i], values.indptr[i + 1]
        data, genes = values.data[lo:hi], values.indices[lo:hi]
        keep = data > 0                                      # input_seq[input_seq > 0]
        data, genes = data[keep][: self.max_seq_len - 1], genes[keep][: self.max_seq_len - 1]
        n = len(genes) + 1                                   # CLS + genes <= max_seq_len
        return {"input_ids": np.concatenate([[self.cls_token], expression_bins(data, self.cap), [self.pad_token]]),
                "genes": np.concatenate([[self.cls_gene], genes, [self.pad_gene]]).astype(np.float32),
                "key_weight": np.concatenate([np.ones(n), [self.max_seq_len - n]]).astype(np.float32)}

    def lengths(self, values) -> np.ndarray:
        rows = np.repeat(np.arange(values.shape[0]), np.diff(values.indptr))
        nonzero = np.bincount(rows, weights=values.data > 0, minlength=values.shape[0]).astype(np.int64)
        return np.minimum(nonzero + 1, self.max_seq_len) + 1


@register
class CellLM(PerformerBackbone):
    name = "celllm"
    summary = "cellLM (OpenBioMed Performer over the nonzero binned genes); CLS output"
    default_dim = 512
    default_batch_size = 8
    requires = ("torch",)
    options = {
        **PerformerBackbone.options,
        "config": Option("", "cellLM config JSON (default: cellLM*.json in --model-dir)"),
        "checkpoint": Option("", "checkpoint file (default: the config's ckpt_path name, else the only *.pth)"),
        "gene_list": Option("", "the model's gene order, one symbol per line (required: not published; default: "
                                "gene_list*.txt in --model-dir)"),
        "trust_checkpoint": Option(False, "unpickle the checkpoint fully (only for a file you trust)", bool),
    }

    # LoRA targets (``scdrugmap finetune``): the Performer's q, k, v, output and feed-forward projections
    lora_attention = LORA_ATTENTION
    lora_mlp = LORA_MLP

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        folder = model_folder(self.model_dir, "cellLM", "cellLM.json and checkpoint4_fixed.pth")
        self.model_dir = folder
        self.config_path = find_file(folder, self.config["config"], ("cellLM*.json",), "cellLM config",
                                     "choose one with --option config=FILE (OpenBioMed's configs/ctc/cellLM.json)")
        self.cfg = CellLMConfig.read(self.config_path)
        given = self.config["checkpoint"]
        if not given and self.cfg.ckpt_name and (folder / self.cfg.ckpt_name).is_file():
            given = self.cfg.ckpt_name
        self.ckpt_path = find_file(folder, given, ("*.pth",), "cellLM checkpoint",
                                   "choose one with --option checkpoint=FILE (the release's is checkpoint4_fixed.pth)")
        self.gene_list_path = find_file(folder, self.config["gene_list"], ("gene_list*.txt",), "cellLM gene list",
                                        NO_GENE_LIST)
        self.genes = read_gene_list(self.gene_list_path)
        if len(self.genes) != self.cfg.gene_num:
            raise UserError(f"the gene list {self.gene_list_path.name} has {len(self.genes)} genes but the config's "
                            f"gene_num is {self.cfg.gene_num}: give the model's own gene order, one symbol per line")
        state = read_checkpoint(self.ckpt_path, "cellLM", self.cfg.param_key, trusted=self.config["trust_checkpoint"])
        model = build_performer(self.cfg.sizes)
        check_state(state, model, self.ckpt_path, f"use the checkpoint released with {self.config_path.name} "
                                                  "(checkpoint4_fixed.pth)")
        load_state(model, state)
        self.model = model.to(self.device).eval()
        n = self.cfg.sizes.num_tokens
        self.pad_token, self.cls_token, self.cap = n - 1, n - 2, n - 3
        self.pad_id = self.pad_token
        self.pad_values = {"genes": float(self.cfg.gene_num + 1), "key_weight": 0.0}
        self._matched: dict = {}

    @property
    def dim(self) -> int:
        return self.cfg.sizes.dim

    def checkpoint_sha256(self) -> str:
        return sha256_files([self.config_path, self.ckpt_path])

    def matching(self, source) -> GeneMatch:
        if source.name not in self._matched:
            self._matched[source.name] = GeneMatch.build(source.symbols(upper=False), self.genes, source.name, "cellLM")
        return self._matched[source.name]

    def cell_tokenizer(self, source) -> NonzeroGeneTokenizer:
        return NonzeroGeneTokenizer(self.matching(source).select, self.cap, self.cls_token, self.pad_token,
                                    self.cfg.max_seq_len)

    def pool(self, input_ids, attention_mask, genes, key_weight):
        value_mask = attention_mask.bool() & (input_ids != self.pad_token)
        hidden = self.model(input_ids, genes.long(), key_weight, value_mask, self.key_max)
        return hidden[:, 0].float()

    def dataset_params(self, source) -> dict:
        m = self.matching(source)
        return {"genes_matched": m.matched, "dataset_genes": m.source_genes}

    def params(self) -> dict:
        return {**super().params(), "config": self.config_path.name, "checkpoint": self.ckpt_path.name,
                "gene_list": self.gene_list_path.name, "gene_list_sha256": sha256_files([self.gene_list_path]),
                "model_genes": self.cfg.gene_num, "max_seq_len": self.cfg.max_seq_len,
                **{f"model_{k}": v for k, v in self.cfg.sizes.as_dict().items()},
                "gene_match": "exact symbol, first source column; absent genes 0",
                "values": "normalize_total 1e4 over the model genes, log2(1+x), float32 (scBERT's; inferred, "
                          "not published for cellLM)",
                "binning": f"floor(min(x, {self.cap})); nonzero genes only, gene-list order, CLS first",
                "truncation": f"first {self.cfg.max_seq_len - 1} nonzero genes by gene-list index",
                "padding": f"official: to max_seq_len {self.cfg.max_seq_len}, only v masked (one PAD position "
                           "weighted by the pad count)",
                "pooling": "CLS output after the final norm", "cells_filtered": "none",
                **self.key_max_params("per cell (= the official forward on one cell)"),
                "attention_precision": "fp32"}
