"""``geneformer``: Geneformer (Theodoris et al. 2023), V1 and V2 checkpoints.

Follows the official ``TranscriptomeTokenizer`` and ``EmbExtractor`` (huggingface.co/
ctheodoris/Geneformer, ``geneformer/tokenizer.py`` and ``emb_extractor.py``):

* checkpoint: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (BertForMaskedLM),
  with the release's ``token_dictionary*.pkl`` and ``gene_median_dictionary*.pkl`` beside it (or
  in ``--option dictionaries=DIR``), and ``gene_name_id_dict*.pkl`` for datasets with symbols;
* rank-value encoding: counts / the cell's total count x 10,000 / the gene's nonzero median,
  nonzero genes of the vocabulary only, ranked high to low. Source genes that map to the same
  Ensembl ID are summed (the official ``collapse_gene_ids``). Ties are broken by the source's gene
  order (a stable sort; the official argsort leaves tie order to numpy);
* V1 (no ``<cls>``/``<eos>`` in the dictionary): the first 2,048 genes. V2 (the dictionary has
  them): ``<cls>``, the first input-size - 2 genes, ``<eos>``. The input size is the config's
  ``max_position_embeddings``;
* cell embedding: mean over the non-padding tokens (V2: gene tokens only, as the official
  ``mean_nonpadding_embs``) of ``hidden_states[L + layer]``, ``layer=-1`` by default, i.e. the
  second-to-last layer, the official ``emb_layer=-1``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import (CellTokenizer, TorchBackbone, load_strict, masked_mean, resolve_model_dir, sha256_files,
                      weights_file, without_ends)
from ..registry import Option, register

MIN_MATCHED = 0.05   # refuse a dataset when fewer than 5% of its genes are in the vocabulary


def _find(folder: Path, pattern: str, what: str, required: bool = True) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        raise UserError(f"{folder} holds several {what} files ({', '.join(p.name for p in found)}): "
                        f"keep one, or point --option dictionaries=DIR at a folder with one")
    if not found:
        if required:
            raise UserError(f"{what} file ({pattern}) not found in {folder}: put the release's file there "
                            "or pass --option dictionaries=DIR")
        return None
    return found[0]


def _load_pickle(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = pickle.load(f)
    except Exception as e:
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is not a dictionary: is it the right file?")
    return value


class RankValueTokenizer(CellTokenizer):
    """Geneformer's rank-value encoding for one dataset (see the module docstring)."""

    def __init__(self, collapse: sp.csr_matrix, token_ids: np.ndarray, medians: np.ndarray, max_genes: int,
                 cls_id: int | None, eos_id: int | None):
        self.collapse = collapse          # source genes x kept vocabulary genes, 1 where a gene maps
        self.token_ids = token_ids
        self.medians = medians
        self.max_genes = max_genes
        self.cls_id, self.eos_id = cls_id, eos_id

    def prepare(self, block):
        block = sp.csr_matrix(block, dtype=np.float64)
        totals = np.asarray(block.sum(axis=1)).ravel()       # the cell's total over all its genes
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        values = sp.csr_matrix(sp.diags(scale) @ (block @ self.collapse) @ sp.diags(1.0 / self.medians))
        values.eliminate_zeros()
        return values

    def tokens(self, values, i: int) -> np.ndarray:
        lo, hi = values.indptr[i], values.indptr[i + 1]
        genes, v = values.indices[lo:hi], values.data[lo:hi]
        order = np.lexsort((genes, -v))[: self.max_genes]     # by value desc, then gene order
        ids = self.token_ids[genes[order]]
        if self.cls_id is not None:
            ids = np.concatenate([[self.cls_id], ids, [self.eos_id]])
        return ids

    def lengths(self, values) -> np.ndarray:
        n = np.minimum(np.diff(values.indptr), self.max_genes)
        return n + (2 if self.cls_id is not None else 0)


@register
class Geneformer(TorchBackbone):
    name = "geneformer"
    summary = "Geneformer V1/V2 (BERT, rank-value encoding); mean of the 2nd-to-last layer"
    default_dim = "256/512/768"
    options = {
        **TorchBackbone.options,
        "layer": Option(-1, "hidden layer relative to the last (-1: second-to-last, 0: last)", int),
        "dictionaries": Option("", "folder with token_dictionary*.pkl etc. (default: --model-dir)"),
    }

    # LoRA targets (``scdrugmap finetune``): BERT's q, k, v and attention output projections; its
    # intermediate and output dense layers
    lora_attention = (r"attention\.self\.(query|key|value)", r"attention\.output\.dense")
    lora_mlp = (r"intermediate\.dense", r"layer\.\d+\.output\.dense")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoConfig

        self.model_dir = resolve_model_dir(self.model_dir)
        folder = Path(self.config["dictionaries"]) if self.config["dictionaries"] else self.model_dir
        self.token_path = _find(folder, "token_dictionary*.pkl", "token dictionary")
        self.median_path = _find(folder, "gene_median_dictionary*.pkl", "gene median dictionary")
        self.names_path = _find(folder, "gene_name_id_dict*.pkl", "gene name dictionary", required=False)
        self.tokens = _load_pickle(self.token_path, "token dictionary")
        self.medians = _load_pickle(self.median_path, "gene median dictionary")
        if "<pad>" not in self.tokens:
            raise UserError(f"{self.token_path} has no <pad> token: not a Geneformer token dictionary")
        self.pad_id = int(self.tokens["<pad>"])
        self.v2 = "<cls>" in self.tokens and "<eos>" in self.tokens
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"{self.model_dir} has no config.json: point --model-dir at a Geneformer checkpoint")
        cfg = AutoConfig.from_pretrained(self.model_dir)
        if cfg.model_type != "bert":
            raise UserError(f"{self.model_dir} holds a {cfg.model_type!r} model, not Geneformer (BERT): "
                            "check --model-dir")
        if cfg.vocab_size != len(self.tokens):
            raise UserError(f"config vocab_size {cfg.vocab_size} does not match the token dictionary's "
                            f"{len(self.tokens)} tokens: use the dictionary of this model version")
        self.input_size = int(cfg.max_position_embeddings)
        self.n_layers = int(cfg.num_hidden_layers)
        if not -self.n_layers <= self.config["layer"] <= 0:
            raise UserError(f"--option layer must be between -{self.n_layers} and 0 for this {self.n_layers}-layer model")
        self.weights = weights_file(self.model_dir)
        self.model = self._load(cfg)
        self._matched: dict = {}

    def _load(self, cfg):
        from transformers import BertForMaskedLM

        return load_strict(BertForMaskedLM, self.model_dir, "Geneformer").bert.to(self.device).eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def checkpoint_sha256(self) -> str:
        return sha256_files([self.model_dir / "config.json", self.weights])

    # -- tokenisation ----------------------------------------------------------------------
    def gene_ids(self, source) -> np.ndarray:
        """Ensembl IDs of the source's genes (None where unknown)."""
        ids = source.ensembl_ids()
        if ids is not None:
            return np.char.upper(ids.astype(str))
        if self.names_path is None:
            raise UserError(f"dataset {source.name!r} has gene symbols only and no gene_name_id_dict*.pkl was found "
                            "to map them to Ensembl IDs: add the release's file next to the dictionaries")
        names = _load_pickle(self.names_path, "gene name dictionary")
        return np.array([names.get(s, "") for s in source.symbols(upper=False)])

    def matching(self, source):
        if source.name not in self._matched:
            self._matched[source.name] = self._match(source)
        return self._matched[source.name]

    def _match(self, source):
        ids = self.gene_ids(source)
        vocab = [g for g in self.medians if g in self.tokens]
        where = {g: k for k, g in enumerate(vocab)}
        cols = [(c, where[g]) for c, g in enumerate(ids) if g in where]
        if len(cols) < max(1, MIN_MATCHED * len(ids)):
            raise UserError(f"dataset {source.name!r}: only {len(cols)} of {len(ids)} genes are in the Geneformer "
                            "vocabulary: check that its gene identifiers are human Ensembl IDs or symbols")
        src, dst = np.array(cols).T
        # vocabulary genes present, in the order of their first source column: the ranking's
        # stable sort then breaks ties in source gene order (the official ranks columns in source order)
        _, first = np.unique(dst, return_index=True)
        used = dst[np.sort(first)]
        remap = np.full(len(vocab), -1)
        remap[used] = np.arange(len(used))
        collapse = sp.csr_matrix((np.ones(len(src)), (src, remap[dst])), shape=(len(ids), len(used)))
        kept = [vocab[k] for k in used]
        return collapse, kept, len(cols)

    def cell_tokenizer(self, source) -> RankValueTokenizer:
        collapse, kept, _ = self.matching(source)
        token_ids = np.array([self.tokens[g] for g in kept], dtype=np.int64)
        medians = np.array([self.medians[g] for g in kept], dtype=np.float64)
        if self.v2:
            return RankValueTokenizer(collapse, token_ids, medians, self.input_size - 2,
                                      int(self.tokens["<cls>"]), int(self.tokens["<eos>"]))
        return RankValueTokenizer(collapse, token_ids, medians, self.input_size, None, None)

    def lora_unused(self) -> tuple:
        """The layers after the pooled hidden state (the last one, with the default ``layer=-1``)."""
        used = self.n_layers + self.config["layer"]          # hidden_states[i] is the output of layer i - 1
        return tuple(f"encoder.layer.{i}." for i in range(used, self.n_layers))

    # -- pooling ---------------------------------------------------------------------------
    def pool(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[self.n_layers + self.config["layer"]]
        # V2: gene tokens only (drop <cls> and <eos>), as the official mean_nonpadding_embs
        return masked_mean(hidden, without_ends(attention_mask) if self.v2 else attention_mask)

    def dataset_params(self, source) -> dict:
        _, kept, matched = self.matching(source)
        return {"genes_matched": matched, "vocabulary_genes_used": len(kept)}

    def params(self) -> dict:
        return {**super().params(), "version": "V2" if self.v2 else "V1", "input_size": self.input_size,
                "special_tokens": self.v2, "layer": self.config["layer"],
                "hidden_states_index": self.n_layers + self.config["layer"], "pooling": "mean over non-padding"
                + (" gene tokens" if self.v2 else " tokens"), "target_sum": 10_000,
                "token_dictionary_sha256": sha256_files([self.token_path]),
                "median_dictionary_sha256": sha256_files([self.median_path]),
                "tie_break": "source gene order (stable)"}
