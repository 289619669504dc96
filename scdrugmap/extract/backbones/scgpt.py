"""``scgpt``: scGPT (Cui et al. 2024, *Nature Methods*), the whole-human model and its family.

A compact re-implementation of only what the official cell embedding needs, written from the
official code (github.com/bowang-lab/scGPT; ``scgpt/tasks/cell_emb.py::embed_data`` and
``get_batch_cell_embeddings``, ``scgpt/data_collator.py::DataCollator``,
``scgpt/preprocess.py::binning``, ``scgpt/model/model.py``, ``scgpt/utils/util.py::load_pretrained``).
Each choice and what it follows:

* **files** (``embed_data``): ``--model-dir`` holds ``best_model.pt`` (a bare state dict),
  ``args.json`` and ``vocab.json``. Sizes come from ``args.json`` (``embsize``, ``nlayers``,
  ``nheads``, ``d_hid``, ``n_bins``, ``max_seq_len``, ``pad_token``, ``pad_value``), so the
  whole-human release (12 layers, 8 heads, 512-d, 51 bins, 1,200 tokens, pad value -2) and
  same-family checkpoints load alike. ``vocab.json`` maps genes to ids 0..n-1; ``<pad>``,
  ``<cls>``, ``<eoc>`` are appended in that order when missing, as ``GeneVocab.append_token``
  does there, and every id is read from the vocabulary.
* **weights** (``TransformerModel`` with ``input_emb_style="continuous"``, ``pre_norm=False``):
  ``encoder`` = embedding + LayerNorm; ``value_encoder`` = value clamped at 512, Linear(1, d),
  ReLU, Linear(d, d), LayerNorm; their sum goes through ``nlayers`` post-norm encoder layers
  (ReLU feed-forward of width ``d_hid``, LayerNorm eps 1e-5, no final norm, no positional
  encoding). State-dict names are the official ones, so the file loads unchanged. Attention
  uses ``scaled_dot_product_attention`` (fused kernels on GPU). Checkpoints saved with
  flash-attention name the fused projection ``self_attn.Wqkv.*`` (or ``self_attn._impl.*`` from
  the newer compatibility wrapper), torch ones ``self_attn.in_proj_*``: the layouts are the same
  (q, k, v blocks, head-major), so they are renamed on load, as ``load_pretrained`` does.
  Loading is **strict**, unlike ``load_pretrained`` (which silently keeps whatever matches): the
  only keys accepted without use are the training heads in :data:`UNUSED_PREFIXES`
  (``flag_encoder``, the expression decoder ``decoder.fc``/``decoder.zero_logit``,
  ``mvc_decoder``, and ``cls_decoder`` of fine-tuned checkpoints); any other unexpected,
  missing or mis-sized key is an error that names a few of them.
* **genes** (``embed_data``): source genes matched to the vocabulary by exact symbol; unmatched
  genes dropped; a dataset with fewer than 5% matched is refused. Matched count in provenance.
* **one cell** (``get_batch_cell_embeddings.Dataset``): the nonzero matched genes in source
  order, after a ``<cls>`` token whose value is ``pad_value``. Raw counts are used as they are:
  ``embed_data`` does not normalise, and the binning is a per-cell rank, so per-cell scaling
  would not change it (``needs_counts``).
* **binning** (``binning`` with ``_digitize(side="both")``): per cell, ``n_bins - 1`` quantile
  edges of its nonzero values; a value gets ``ceil(r * (right - left) + left)`` with
  ``left``/``right`` the two ``np.digitize`` sides and ``r`` uniform, so a value equal to several
  edges (ties, very common in counts) gets a random bin between them. The collator hard-codes
  51 bins, the release's ``n_bins``; here ``n_bins`` comes from ``args.json``.
* **long cells** (``DataCollator._sample``): above ``max_length`` tokens (``<cls>`` included),
  ``<cls>`` and ``max_length - 1`` genes drawn uniformly without replacement are kept; bins are
  computed before sampling, over all the cell's genes. Kept genes stay in source order (the
  official permutation shuffles them; without positional encoding the order cannot change the
  output).
* **randomness**: the official tie-breaking (``np.random.rand``) and sampling
  (``torch.randperm``) draw from global generators whose state depends on DataLoader workers and
  batch order, so an official embedding is stochastic and cannot be reproduced bit for bit.
  Here each cell draws from its own numpy ``Generator`` seeded from ``(--option seed, dataset
  name, the cell's matched counts)``, ties first and sampling second, as the official order: a
  cell's tokens do not depend on its batch, chunk, chunk size, a resumed run or the rank that
  embeds it. (The engine hands a tokenizer a block of rows without its offset, so the cell's
  content, not its row number, identifies it; identical cells get identical tokens.)
* **embedding** (``get_batch_cell_embeddings``): the last layer's output at ``<cls>``
  (position 0), divided by its L2 norm. On CUDA the official code runs under fp16 autocast:
  ``--option precision=auto`` does the same (fp32 on CPU).
* A cell without any matched nonzero gene (the official code would fail on it) is ``<cls>``
  alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, Ragged, TorchBackbone, official_in_proj_names, resolve_model_dir, sha256_files
from ..registry import Option, register

MIN_MATCHED = 0.05                          # refuse a dataset when fewer than 5% of its genes match
FILES = ("best_model.pt", "args.json", "vocab.json")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")   # appended in this order when vocab.json lacks them
# Training heads present in released checkpoints that the cell embedding does not use
# (dev-temp:scgpt/model/model.py builds flag_encoder, decoder and mvc_decoder for pretraining;
# fine-tuned checkpoints add cls_decoder).
UNUSED_PREFIXES = ("flag_encoder.", "decoder.fc.", "decoder.zero_logit.", "mvc_decoder.", "cls_decoder.")
# Fused-projection names of flash-attention checkpoints -> torch names, and the variant found.
ATTENTION_RENAMES = (("self_attn._impl.Wqkv.", "self_attn.in_proj_", "_impl.Wqkv"),
                     ("self_attn._impl.out_proj.", "self_attn.out_proj.", "_impl.Wqkv"),
                     ("self_attn.Wqkv.", "self_attn.in_proj_", "Wqkv"))
MAX_VALUE = 512                             # ContinuousValueEncoder clamps values here


def quantile_bins(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """One cell's values -> bins 0..n_bins-1 (zeros stay 0), ties spread at random (official ``binning``)."""
    values = np.asarray(values)
    digits = np.zeros(len(values), dtype=np.int64)
    if len(values) == 0 or values.max() == 0:
        return digits
    nonzero = values != 0
    x = values[nonzero]
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)                 # edges <= x
    right = np.digitize(x, edges, right=True)    # edges < x
    digits[nonzero] = np.ceil(rng.random(len(x)) * (right - left) + left).astype(np.int64)
    return digits


def sorted_quantiles(xs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.quantile(x, q)`` (method linear) from ``xs = np.sort(x)``, computed as numpy does it
    (virtual index ``(n - 1) q``, its floor and the next index, numpy's two-sided ``_lerp``), so
    the edges are the same floats without its per-call checks and partition."""
    n = len(xs)
    v = (n - 1) * q
    prev = np.floor(v)
    nxt = prev + 1
    above = v >= n - 1
    prev[above] = -1
    nxt[above] = -1
    prev, nxt = prev.astype(np.intp), nxt.astype(np.intp)
    gamma = v - prev
    a, b = xs[prev], xs[nxt]
    d = b - a
    out = a + d * gamma
    upper = gamma >= 0.5
    out[upper] = (b - d * (1 - gamma))[upper]
    return out


def _salt(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class BinnedTokenizer(CellTokenizer):
    """``<cls>`` + the cell's nonzero vocabulary genes, with binned values (see the module docstring)."""

    def __init__(self, cols: np.ndarray, gene_ids: np.ndarray, cls_id: int, pad_value: float, n_bins: int,
                 max_length: int, seed: int, dataset: str = ""):
        self.cols, self.gene_ids = cols, gene_ids   # source columns in the vocabulary, and their ids
        self.cls_id, self.pad_value = cls_id, float(pad_value)
        self.n_bins, self.max_length = n_bins, max_length
        self.seed, self.salt = seed, _salt(dataset)

    def prepare(self, block):
        values = sp.csr_matrix(sp.csr_matrix(block)[:, self.cols], dtype=np.float32)
        values.eliminate_zeros()
        values.sort_indices()
        return values

    def rng(self, genes: np.ndarray, counts: np.ndarray) -> np.random.Generator:
        """The cell's own generator: from the seed, the dataset and the cell's matched counts."""
        content = hashlib.blake2b(np.ascontiguousarray(genes, dtype=np.int64).tobytes()
                                  + np.ascontiguousarray(counts, dtype=np.float64).tobytes(), digest_size=8)
        return np.random.default_rng([self.seed, self.salt, int.from_bytes(content.digest(), "little")])

    def tokens(self, values, i: int) -> dict:
        lo, hi = values.indptr[i], values.indptr[i + 1]
        genes, counts = values.indices[lo:hi], values.data[lo:hi]
        rng = self.rng(genes, counts)
        bins = quantile_bins(counts, self.n_bins, rng)                 # over all genes, before sampling
        if len(genes) > self.max_length - 1:
            keep = np.sort(rng.permutation(len(genes))[: self.max_length - 1])
            genes, bins = genes[keep], bins[keep]
        return {"input_ids": np.concatenate([[self.cls_id], self.gene_ids[genes]]).astype(np.int64),
                "values": np.concatenate([[self.pad_value], bins]).astype(np.float32)}

    def tokens_many(self, values, rows) -> Ragged:
        """:meth:`tokens` of each cell of ``rows``: the same generator and draws per cell, the
        quantile edges from one sort (:func:`sorted_quantiles`, not ``np.quantile``), ``digitize``
        as the ``searchsorted`` it runs, and the batch laid out at once."""
        q = np.linspace(0, 1, self.n_bins - 1)
        ids, bins, lengths = [], [], []
        for i in np.asarray(rows, dtype=np.int64):
            lo, hi = values.indptr[i], values.indptr[i + 1]
            genes, counts = values.indices[lo:hi], values.data[lo:hi]
            rng = self.rng(genes, counts)
            digits = np.zeros(len(counts), dtype=np.int64)
            if len(counts) and counts.max() != 0:
                nonzero = counts != 0
                x = counts[nonzero]
                edges = sorted_quantiles(np.sort(x), q)
                left = edges.searchsorted(x, side="right")           # np.digitize(x, edges)
                right = edges.searchsorted(x, side="left")           # np.digitize(x, edges, right=True)
                digits[nonzero] = np.ceil(rng.random(len(x)) * (right - left) + left).astype(np.int64)
            if len(genes) > self.max_length - 1:
                keep = np.sort(rng.permutation(len(genes))[: self.max_length - 1])
                genes, digits = genes[keep], digits[keep]
            ids.append(genes)
            bins.append(digits)
            lengths.append(len(genes) + 1)
        lengths = np.array(lengths, dtype=np.int64)
        first = Ragged.offsets(lengths)[:-1]
        body = np.ones(int(lengths.sum()), dtype=bool)
        body[first] = False
        input_ids = np.full(len(body), self.cls_id, dtype=np.int64)
        value = np.full(len(body), self.pad_value, dtype=np.float32)
        if len(ids):
            input_ids[body] = self.gene_ids[np.concatenate(ids)]
            value[body] = np.concatenate(bins)
        return Ragged(lengths, {"input_ids": input_ids, "values": value})

    def lengths(self, values) -> np.ndarray:
        return np.minimum(np.diff(values.indptr), self.max_length - 1) + 1


# -- files ----------------------------------------------------------------------------------
def read_args(path: Path) -> dict:
    """The sizes and token settings of ``args.json``, checked."""
    try:
        args = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: "
                        "use the args.json released with the checkpoint") from None
    if not isinstance(args, dict):
        raise UserError(f"{path} is not a JSON object: use the args.json released with the checkpoint")
    out = {}
    for key, default in (("embsize", None), ("nlayers", None), ("nheads", None), ("d_hid", None),
                         ("n_bins", 51), ("max_seq_len", 1200)):
        value = args.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{path}: {key!r} is {'missing' if value is None else repr(value)}, expected a positive "
                            "integer: use the args.json released with the checkpoint")
        out[key] = value
    if out["embsize"] % out["nheads"]:
        raise UserError(f"{path}: embsize {out['embsize']} is not a multiple of nheads {out['nheads']}")
    if out["n_bins"] < 3:
        raise UserError(f"{path}: n_bins must be at least 3")
    pad_value = args.get("pad_value", -2)
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)):
        raise UserError(f"{path}: pad_value {pad_value!r} is not a number")
    out["pad_value"] = pad_value
    out["pad_token"] = str(args.get("pad_token", "<pad>"))
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise UserError(f"{path}: input_emb_style {style!r}: only the continuous value encoder of the released "
                        "models is supported (the one the official embed_data builds)")
    return out


def read_vocab(path: Path, pad_token: str = "<pad>") -> tuple[dict, list]:
    """Gene -> id, with the special tokens appended as the official ``GeneVocab`` does when missing."""
    try:
        vocab = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: "
                        "use the vocab.json released with the checkpoint") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise UserError(f"{path} is not a mapping of gene symbols to integer ids: use the release's vocab.json")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{path}: the ids are not 0..{len(vocab) - 1}, each once: use the release's vocab.json")
    added = []
    for token in dict.fromkeys((pad_token, *SPECIAL_TOKENS[1:])):
        if token not in vocab:
            vocab[token] = len(vocab)
            added.append(token)
    return vocab, added


# -- the network (torch is imported on first use: the registry loads without torch) ----------
@functools.cache
def _nn() -> types.SimpleNamespace:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GeneEncoder(nn.Module):
        def __init__(self, n_tokens: int, d: int):
            super().__init__()
            self.embedding = nn.Embedding(n_tokens, d)
            self.enc_norm = nn.LayerNorm(d)

        def forward(self, ids):
            return self.enc_norm(self.embedding(ids))

    class ContinuousValueEncoder(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.linear1 = nn.Linear(1, d)
            self.linear2 = nn.Linear(d, d)
            self.norm = nn.LayerNorm(d)

        def forward(self, values):
            x = values.unsqueeze(-1).clamp(max=MAX_VALUE)
            return self.norm(self.linear2(F.relu(self.linear1(x))))

    class SelfAttention(nn.Module):
        """Multi-head self-attention with torch's fused in-projection layout, run by SDPA. The
        projection is an ``nn.Linear`` (``in_proj``) stored as ``in_proj_weight``/``in_proj_bias``,
        so that LoRA can wrap it (see :func:`~scdrugmap.extract.engine.official_in_proj_names`)."""

        def __init__(self, d: int, n_heads: int):
            super().__init__()
            self.n_heads = n_heads
            self.in_proj = nn.Linear(d, 3 * d)
            self.out_proj = nn.Linear(d, d)
            nn.init.xavier_uniform_(self.in_proj.weight)
            nn.init.zeros_(self.in_proj.bias)
            official_in_proj_names(self)

        def forward(self, x, keep):
            b, n, d = x.shape
            q, k, v = self.in_proj(x).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)   # keep: (b, 1, 1, n), True = attend
            return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    class EncoderLayer(nn.Module):
        """Post-norm: x = norm1(x + attn(x)); x = norm2(x + linear2(relu(linear1(x))))."""

        def __init__(self, d: int, n_heads: int, d_hid: int):
            super().__init__()
            self.self_attn = SelfAttention(d, n_heads)
            self.linear1 = nn.Linear(d, d_hid)
            self.linear2 = nn.Linear(d_hid, d)
            self.norm1 = nn.LayerNorm(d, eps=1e-5)
            self.norm2 = nn.LayerNorm(d, eps=1e-5)

        def forward(self, x, keep):
            x = self.norm1(x + self.self_attn(x, keep))
            return self.norm2(x + self.linear2(F.relu(self.linear1(x))))

    class Stack(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = nn.ModuleList(layers)

    class ScGPTEncoder(nn.Module):
        """Gene + value embeddings through the encoder layers: ``TransformerModel._encode``."""

        def __init__(self, n_tokens: int, d: int, n_heads: int, d_hid: int, n_layers: int):
            super().__init__()
            self.encoder = GeneEncoder(n_tokens, d)
            self.value_encoder = ContinuousValueEncoder(d)
            self.transformer_encoder = Stack([EncoderLayer(d, n_heads, d_hid) for _ in range(n_layers)])

        def forward(self, ids, values, attention_mask):
            x = self.encoder(ids) + self.value_encoder(values)
            keep = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
            for layer in self.transformer_encoder.layers:
                x = layer(x, keep)
            return x

    return types.SimpleNamespace(ScGPTEncoder=ScGPTEncoder)


def official_names(state: dict) -> tuple[dict, str]:
    """Flash-attention names -> torch names; returns the renamed dict and the variant found."""
    renamed, variants = {}, set()
    for key, value in state.items():
        for old, new, variant in ATTENTION_RENAMES:
            if old in key:
                key = key.replace(old, new)
                variants.add(variant)
                break
        else:
            if "self_attn.in_proj_" in key:
                variants.add("in_proj")
        renamed[key] = value
    if len(variants) > 1:
        raise UserError(f"the checkpoint mixes attention layouts ({', '.join(sorted(variants))}): it is not one "
                        "scGPT checkpoint")
    return renamed, (variants.pop() if variants else "none")


def load_checkpoint(model, path: Path) -> tuple[str, list]:
    """Loads ``best_model.pt`` into ``model`` strictly; returns the attention variant and the
    unused head prefixes found."""
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        " (expected scGPT's best_model.pt, a state dict saved by torch.save)") from None
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"{path} is not a state dict of tensors: expected scGPT's best_model.pt")
    state, variant = official_names(raw)
    unused = sorted({p.rstrip(".") for k in state for p in UNUSED_PREFIXES if k.startswith(p)})
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in (("missing", missing),
                                                                              ("unexpected", unexpected)) if v]
        raise UserError(f"{path} does not match the scGPT model of args.json: {'; '.join(parts)}: "
                        "is it an scGPT checkpoint, with the args.json released beside it?")
    sized = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if sized:
        raise UserError(f"{path}: {len(sized)} weights are not the size args.json and vocab.json imply "
                        f"(e.g. {'; '.join(sized[:2])}): use the args.json and vocab.json released with it")
    model.load_state_dict(state, strict=True)
    return variant, unused


@register
class ScGPT(TorchBackbone):
    name = "scgpt"
    summary = "scGPT (binned expression values); L2-normalised <cls> output of the last layer"
    default_dim = 512
    requires = ("torch",)
    options = {
        **TorchBackbone.options,
        "precision": Option("auto", "auto (fp16 on CUDA, as the official embed_data; fp32 on CPU), fp32, bf16 or fp16"),
        "max_length": Option(0, "tokens per cell, <cls> included (0: args.json max_seq_len, 1200 for the release)",
                             int),
        "seed": Option(0, "seeds the random tie-breaking of binning and gene sampling above max_length", int, min=0),
    }

    # LoRA targets (``scdrugmap finetune``): the packed q/k/v projection and the output
    # projection of every layer; the feed-forward layers of the encoder (not the value encoder)
    lora_attention = (r"self_attn\.in_proj", r"self_attn\.out_proj")
    lora_mlp = (r"layers\.\d+\.linear[12]",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model_dir = resolve_model_dir(self.model_dir)
        for name in FILES:
            if not (self.model_dir / name).is_file():
                raise UserError(f"{self.model_dir} has no {name}: scGPT needs the release's "
                                f"{', '.join(FILES)} in --model-dir")
        self.args = read_args(self.model_dir / "args.json")
        self.vocab, self.added_tokens = read_vocab(self.model_dir / "vocab.json", self.args["pad_token"])
        self.max_length = self.config["max_length"] or self.args["max_seq_len"]
        if self.max_length < 2:
            raise UserError("--option max_length must be at least 2 (<cls> and one gene)")
        if self.config["seed"] < 0:
            raise UserError("--option seed must be a non-negative integer")
        self.pad_id = int(self.vocab[self.args["pad_token"]])
        self.cls_id = int(self.vocab["<cls>"])
        self.pad_values = {"values": float(self.args["pad_value"])}
        a = self.args
        model = _nn().ScGPTEncoder(len(self.vocab), a["embsize"], a["nheads"], a["d_hid"], a["nlayers"])
        self.attention_variant, self.unused_heads = load_checkpoint(model, self.model_dir / "best_model.pt")
        self.model = model.to(self.device).eval()
        self._matched: dict = {}
        self._sha256 = None

    @property
    def precision(self) -> str:
        p = self.config["precision"]
        return ("fp16" if self.on_cuda else "fp32") if p == "auto" else p

    @property
    def dim(self) -> int:
        return int(self.args["embsize"])

    def checkpoint_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_files([self.model_dir / name for name in FILES])
        return self._sha256

    # -- tokenisation ----------------------------------------------------------------------
    def matching(self, source):
        if source.name not in self._matched:
            symbols = source.symbols(upper=False)
            cols = np.array([c for c, s in enumerate(symbols) if s in self.vocab and s not in SPECIAL_TOKENS],
                            dtype=np.int64)
            if len(cols) < max(1, MIN_MATCHED * len(symbols)):
                raise UserError(f"dataset {source.name!r}: only {len(cols)} of {len(symbols)} gene symbols are in the "
                                "scGPT vocabulary: check that var holds human gene symbols (or --symbol-col at ingest)")
            self._matched[source.name] = (cols, np.array([self.vocab[symbols[c]] for c in cols], dtype=np.int64),
                                          len(symbols))
        return self._matched[source.name]

    def cell_tokenizer(self, source) -> BinnedTokenizer:
        cols, ids, _ = self.matching(source)
        return BinnedTokenizer(cols, ids, self.cls_id, self.args["pad_value"], self.args["n_bins"], self.max_length,
                               self.config["seed"], source.name)

    def pool(self, input_ids, attention_mask, values):
        import torch.nn.functional as F

        hidden = self.model(input_ids, values, attention_mask)
        return F.normalize(hidden[:, 0].float(), dim=-1)        # <cls>, L2-normalised

    def dataset_params(self, source) -> dict:
        cols, _, n = self.matching(source)
        return {"genes_matched": int(len(cols)), "genes_in_dataset": int(n)}

    def params(self) -> dict:
        a = self.args
        return {**super().params(), "n_bins": a["n_bins"], "max_len": self.max_length, "pad_value": a["pad_value"],
                "seed": self.config["seed"], "attention_weights": self.attention_variant,
                "vocab_sha256": sha256_files([self.model_dir / "vocab.json"]), "vocab_size": len(self.vocab),
                "special_tokens_added": self.added_tokens, "unused_checkpoint_heads": self.unused_heads,
                "architecture": {k: a[k] for k in ("embsize", "nlayers", "nheads", "d_hid")},
                "gene_matching": "exact symbol in vocab.json",
                "binning": "per-cell quantiles of nonzero raw counts, official tie handling, before sampling",
                "randomness": "numpy Generator per cell from (seed, dataset, the cell's matched counts)",
                "pooling": "<cls> output of the last layer, L2-normalised"}
