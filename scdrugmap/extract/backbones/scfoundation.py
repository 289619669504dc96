"""``scfoundation``: scFoundation (Hao et al. 2024, *Nature Methods*), the xTrimoGene cell embedding.

A compact re-implementation of the parts of the official release
(github.com/biomap-research/scFoundation, folder ``model/``) that the cell embedding runs; the
weights load unchanged from the release's ``models.ckpt``. Each choice and its official source:

* **checkpoint** (``load.py::load_model_frommmf``, ``convertconfig``): ``models.ckpt`` is a dict
  with the entries ``gene``, ``cell`` and ``rde``, each ``{"config", "state_dict"}``. The cell
  embedding uses ``cell`` (``get_embedding.py``: ``--output_type cell --version ce``);
  ``--option entry=rde|gene`` picks another one. The hyper-parameters are
  ``config["model_config"][config["model"]]`` updated with ``config["dataset_config"]["rnaseq"]``;
  the state-dict keys lose their ``model.`` prefix and load **strictly**, as the official
  ``MaeAutobin.load_state_dict`` does: a missing, unexpected or mis-shaped key is an error.
* **architecture** (``pretrainmodels/select_model.py``, ``mae_autobin.py``, ``transformer.py``):
  ``token_emb`` is ``AutoDiscretizationEmbedding2``: a value ``v`` becomes
  ``softmax(a*h + mlp2(h)) @ emb.weight`` with ``h = leaky_relu(mlp(v), 0.1)`` and ``a =
  bin_alpha`` (soft assignment to ``bin_num`` learned bins); ``pos_emb`` is an embedding of
  ``seq_len + 1`` rows indexed by the gene's index (T: ``seq_len - 2``, S: ``seq_len - 1``); the
  encoder is ``pytorchTransformerModule``: ``depth`` stock ``nn.TransformerEncoderLayer`` (post-norm,
  ReLU, feed-forward ``4 * hidden_dim``, ``batch_first``) and a final ``LayerNorm``. Sizes come from
  the checkpoint's config (released model: 768-d, 12 layers, 12 heads; like ``select_module``, the
  encoder ignores the config's ``norm_first`` and ``dim_head``). The layers hold the stock layer's
  weights under its names, with the packed q/k/v projection as an ``nn.Linear`` (so that LoRA can
  wrap it, ``scdrugmap finetune``). The performer decoder,
  ``decoder_embed``, ``norm`` and ``to_final`` are declared with the official names and shapes
  (parameters and buffers only, ``projection_matrix`` and ``calls_since_last_redraw`` included)
  so that the strict load accepts the file, but are never run: the cell embedding does not use them.
* **mask/pad ids by value** (``AutoDiscretizationEmbedding2.forward``, ``load.py::gatherData``):
  the official code swaps the embedding of any input *value* equal to ``mask_token_id`` (102) for
  ``emb_mask`` and equal to ``pad_token_id`` (103) for ``emb_pad``, and masks tokens whose value is
  103 as attention keys (its padding mask is ``value == 103``). Reproduced as is. log1p values of
  counts per 10,000 stay below 9.22 and S = log10(total count) below 103, so only an unusual T
  (e.g. ``target=t103``) can hit them.
* **preprocessing** (``get_embedding.py::main``, ``main_gene_selection``, single cell,
  ``--pre_normalized F``): the source genes are aligned to the 19,264 genes of
  ``OS_scRNA_gene_index.19264.tsv`` (missing genes are 0, other genes dropped); values are
  ``log1p(x / x.sum() * 1e4)`` with the sum over the *aligned* genes, computed in float64 then
  rounded to float32 as the official ``torch.tensor(list)`` does. Two tokens follow the genes: T
  (``--tgthighres``, default ``t4``: T = 4; ``fN``: log10(total * N); ``aN``: log10(total) + N;
  ``--option target=...``) and S = log10(total).
* **which tokens enter** (``load.py::gatherData``): only values > 0, genes in index order then T
  then S (zero genes, and T or S when <= 0, e.g. S of a cell with a total of 1, are left out).
* **batching** (not official: its script embeds one cell at a time): cells are right-padded
  (engine), padding is a key padding mask, and pooled statistics exclude it, so a cell's
  embedding does not depend on its batch. The layers' eval forward is the stock
  ``nn.TransformerEncoderLayer``'s written out with attention through PyTorch SDPA, because the
  stock fast path materialises every attention matrix once given a padding mask.
* **pooling** (``get_embedding.py``, ``--pool_type``): ``all`` (default) is
  ``[h[-1], h[-2], max(h[:-2]), mean(h[:-2])]``: the last token (S), the second-to-last (T),
  then max and mean over the tokens before them (genes): 4 x hidden (3,072 for the release).
  As officially, the slots are positions: the last two tokens of the cell, whatever they are.
  ``max``: max over all tokens, T and S included (hidden-d). Cells that the official script
  cannot pool (fewer than three tokens, e.g. no counts on the index's genes) get 0 in the slots
  that do not exist.
* **duplicates and case** (not specified officially): a gene index gene takes the first source
  gene with exactly its symbol, else the first whose upper-cased symbol matches (the official
  match is exact); each source gene is used once.
* **precision**: the official embedding runs in fp32; the engine's ``--option precision=auto``
  uses bf16 autocast on CUDA (``precision=fp32`` is the official arithmetic).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, TorchBackbone, key_mismatches, official_in_proj_names, sha256_files
from ..registry import Option, register

CHECKPOINT = "models.ckpt"
GENE_INDEX = "OS_scRNA_gene_index.19264.tsv"
ENTRIES = ("cell", "rde", "gene")
POOLS = ("all", "max")
TARGET_SUM = 1e4
MIN_MATCHED = 0.05   # refuse a dataset when fewer than 5% of its genes are in the gene index


# -- checkpoint ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What the cell embedding needs from a ``models.ckpt`` entry's config."""

    seq_len: int            # genes + 2 (T and S)
    hidden: int
    depth: int
    heads: int
    dec_hidden: int
    dec_depth: int
    dec_heads: int
    dec_dim_head: int
    bin_num: int
    bin_alpha: float
    pad_id: int
    mask_id: int

    @classmethod
    def from_entry(cls, config, where: str) -> "Config":
        """The official ``convertconfig``: model_config[model] updated with dataset_config.rnaseq."""
        try:
            kind = config["model"]
            flat = {**config["model_config"][kind], **config.get("dataset_config", {}).get("rnaseq", {})}
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{where} has no model config (config['model_config'][config['model']]): "
                            "is it scFoundation's models.ckpt?") from None
        if kind != "mae_autobin":
            raise UserError(f"{where} holds a {kind!r} model; scdrugmap reads scFoundation's 'mae_autobin'")
        try:
            enc, dec = flat["encoder"], flat["decoder"]
            if enc["module_type"] != "transformer" or dec["module_type"] != "performer":
                raise UserError(f"{where}: encoder/decoder types {enc['module_type']!r}/{dec['module_type']!r} "
                                "are not the release's 'transformer'/'performer'")
            cfg = cls(int(flat["seq_len"]), int(enc["hidden_dim"]), int(enc["depth"]), int(enc["heads"]),
                      int(dec["hidden_dim"]), int(dec["depth"]), int(dec["heads"]), int(dec["dim_head"]),
                      int(flat["bin_num"]), float(flat["bin_alpha"]), int(flat["pad_token_id"]),
                      int(flat["mask_token_id"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: config lacks or mis-types {e}: is it scFoundation's models.ckpt?") from None
        if min(cfg.hidden, cfg.depth, cfg.heads, cfg.dec_dim_head, cfg.bin_num) < 1 or cfg.hidden % cfg.heads:
            raise UserError(f"{where}: encoder hidden_dim {cfg.hidden} / heads {cfg.heads} / depth {cfg.depth} "
                            "is not a valid transformer")
        return cfg


def build_model(cfg: Config, device="meta"):
    """MaeAutobin's module tree with the official names and shapes (weights uninitialised on ``meta``).

    Only ``token_emb``, ``pos_emb`` and ``encoder`` are run; the rest exists for the strict load.
    """
    import torch
    from torch import nn

    def tree(**children):
        return nn.ModuleDict(children)

    def buffers(**tensors):
        holder = nn.Module()
        for name, value in tensors.items():
            holder.register_buffer(name, value)
        return holder

    def encoder_block():
        """``nn.TransformerEncoderLayer``'s weights under its names (post-norm, eps 1e-5), with the
        packed q/k/v projection held by an ``nn.Linear`` (stored as ``self_attn.in_proj_weight``/
        ``in_proj_bias``) so that LoRA can wrap it; run by :func:`encoder_layer`."""
        attn = tree(in_proj=nn.Linear(d, 3 * d), out_proj=nn.Linear(d, d))
        attn.num_heads = cfg.heads
        official_in_proj_names(attn)
        return tree(self_attn=attn, linear1=nn.Linear(d, 4 * d), linear2=nn.Linear(4 * d, d),
                    norm1=nn.LayerNorm(d, eps=1e-5), norm2=nn.LayerNorm(d, eps=1e-5))

    d, dd, inner = cfg.hidden, cfg.dec_hidden, cfg.dec_heads * cfg.dec_dim_head
    nb_features = int(cfg.dec_dim_head * math.log(cfg.dec_dim_head))   # performer FastAttention default
    with torch.device(device):
        performer_layers = nn.ModuleList(nn.ModuleList([
            tree(norm=nn.LayerNorm(dd),                                  # PreLayerNorm(SelfAttention)
                 fn=tree(to_q=nn.Linear(dd, inner), to_k=nn.Linear(dd, inner), to_v=nn.Linear(dd, inner),
                         to_out=nn.Linear(inner, dd),
                         fast_attention=buffers(projection_matrix=torch.empty(nb_features, cfg.dec_dim_head)))),
            tree(norm=nn.LayerNorm(dd),                                  # PreLayerNorm(Chunk(FeedForward))
                 fn=tree(fn=tree(w1=nn.Linear(dd, 4 * dd), w2=nn.Linear(4 * dd, dd)))),
        ]) for _ in range(cfg.dec_depth))
        performer = tree(net=tree(layers=performer_layers))
        performer.register_buffer("calls_since_last_redraw", torch.tensor(0))
        return tree(
            token_emb=tree(mlp=nn.Linear(1, cfg.bin_num), mlp2=nn.Linear(cfg.bin_num, cfg.bin_num),
                           emb=nn.Embedding(cfg.bin_num, d), emb_mask=nn.Embedding(1, d),
                           emb_pad=nn.Embedding(1, d)),
            pos_emb=nn.Embedding(cfg.seq_len + 1, d),
            encoder=tree(transformer_encoder=nn.ModuleList(encoder_block() for _ in range(cfg.depth)),
                         norm=nn.LayerNorm(d)),
            decoder=tree(performer=performer, norm=nn.LayerNorm(dd)),
            decoder_embed=nn.Linear(d, dd), norm=nn.LayerNorm(dd), to_final=nn.Linear(dd, 1),
        )


def check_keys(expected: dict, state: dict, where: str) -> None:
    """The strict load's test, as one readable line: missing, unexpected and mis-shaped keys."""
    problems = key_mismatches(state, expected)
    if problems:
        raise UserError(f"{where} does not match scFoundation's MaeAutobin: {problems}")


def value_embedding(token_emb, values, cfg: Config):
    """AutoDiscretizationEmbedding2: soft binning of each value, then the mask/pad swap by value."""
    import torch
    import torch.nn.functional as F

    h = F.leaky_relu(token_emb.mlp(values.unsqueeze(-1)), 0.1)
    weights = torch.softmax(cfg.bin_alpha * h + token_emb.mlp2(h), dim=-1)
    emb = weights @ token_emb.emb.weight.to(weights.dtype)
    for token_id, table in ((cfg.mask_id, token_emb.emb_mask), (cfg.pad_id, token_emb.emb_pad)):
        emb = torch.where((values == token_id).unsqueeze(-1), table.weight[0].to(emb.dtype), emb)
    return emb


def encoder_layer(layer, x, attend):
    """``nn.TransformerEncoderLayer.forward`` in eval (post-norm, ReLU) with its weights, the
    attention through ``scaled_dot_product_attention`` and a (batch, 1, 1, keys) mask. The stock
    layer's eval fast path builds the full (batch, heads, tokens, tokens) matrix when given a
    padding mask: 18 GB and 25x the time for 16 cells of 6,000 genes on a CPU. Every projection
    is called as a module, so LoRA adapters on them are used."""
    import torch.nn.functional as F

    attn = layer.self_attn
    b, n, d = x.shape
    q, k, v = attn.in_proj(x).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
    x = layer.norm1(x + attn.out_proj(out.transpose(1, 2).reshape(b, n, d)))
    return layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))


def encode(model, values, positions, real, cfg: Config):
    """Hidden states of the encoder (final norm included) for a right-padded batch."""
    x = value_embedding(model.token_emb, values, cfg) + model.pos_emb(positions)
    attend = real & (values != cfg.pad_id)        # the official padding mask is value == pad id
    for layer in model.encoder.transformer_encoder:
        x = encoder_layer(layer, x, attend)
    return model.encoder.norm(x)


def pool_hidden(hidden, real, pool: str):
    """``all``: [last, second-to-last, max and mean over the tokens before them]; ``max``: max of all."""
    import torch

    hidden = hidden.float()
    n = real.sum(1)
    if pool == "max":
        out = hidden.masked_fill(~real.unsqueeze(-1), -math.inf).amax(1)
        return torch.where((n > 0).unsqueeze(-1), out, 0.0)
    rows = torch.arange(len(hidden), device=hidden.device)

    def slot(k):   # the k-th token from the end (k = 1: last), 0 where the cell is shorter
        return torch.where((n >= k).unsqueeze(-1), hidden[rows, (n - k).clamp(min=0)], 0.0)

    genes = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) < (n - 2).unsqueeze(1)
    count = genes.sum(1, keepdim=True)
    g = genes.unsqueeze(-1)
    gmax = torch.where(count > 0, hidden.masked_fill(~g, -math.inf).amax(1), 0.0)
    gmean = hidden.masked_fill(~g, 0.0).sum(1) / count.clamp(min=1)
    return torch.cat([slot(1), slot(2), gmax, gmean], dim=-1)


# -- gene index and tokens -------------------------------------------------------------------
def read_gene_index(path: Path) -> list[str]:
    """The official gene list: a TSV with columns gene_name and index (0..n-1 in row order)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the gene index {path}: {type(e).__name__}") from None
    try:
        names = [r["gene_name"].strip() for r in rows]
        ok = [int(r["index"]) for r in rows] == list(range(len(rows)))
    except (KeyError, ValueError, TypeError, AttributeError):
        ok = False
    if not rows or not ok or len(set(names)) != len(names):
        raise UserError(f"{path} is not scFoundation's gene index (a TSV with columns gene_name, index 0..n-1 "
                        "and unique genes): use the release's OS_scRNA_gene_index.19264.tsv")
    return names


def parse_target(text: str) -> tuple[str, float]:
    """The official ``--tgthighres``: ``tN``, ``fN`` or ``aN``."""
    try:
        kind, number = text[0], float(text[1:])
        if kind not in "tfa" or not math.isfinite(number):
            raise ValueError
    except (IndexError, ValueError):
        raise UserError(f"--option target={text!r}: use tN (T = N), fN (T = log10(total x N)) or aN "
                        "(T = log10(total) + N), as the official --tgthighres (default t4)") from None
    return kind, number


@dataclass
class Prepared:
    values: sp.csr_matrix    # cells x index genes: log1p values > 0 (float32), columns sorted
    extra: np.ndarray        # cells x 2: T and S (float32)

    @property
    def shape(self):
        return self.values.shape


class ScFoundationTokenizer(CellTokenizer):
    """Aligned, normalised genes with value > 0 then T and S; ids are positions (gene index)."""

    def __init__(self, align: sp.csr_matrix, target: tuple[str, float]):
        self.align = align                    # source genes x index genes, one 1 per matched pair
        self.n_genes = align.shape[1]
        self.kind, self.number = target
        self.extra_ids = np.array([self.n_genes, self.n_genes + 1], dtype=np.int64)   # T, S positions

    def prepare(self, block) -> Prepared:
        aligned = sp.csr_matrix(sp.csr_matrix(block, dtype=np.float64) @ self.align)
        aligned.sort_indices()
        totals = np.asarray(aligned.sum(axis=1)).ravel()
        per_entry = np.repeat(totals, np.diff(aligned.indptr))
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.log1p(aligned.data / per_entry * TARGET_SUM).astype(np.float32)
            s = np.log10(totals)
            t = {"t": np.full_like(totals, self.number), "f": np.log10(totals * self.number),
                 "a": s + self.number}[self.kind]
        data[~(data > 0)] = 0                  # only values > 0 enter the encoder
        values = sp.csr_matrix((data, aligned.indices, aligned.indptr), shape=aligned.shape)
        values.eliminate_zeros()
        return Prepared(values, np.stack([t, s], axis=1).astype(np.float32))

    def tokens(self, prepared: Prepared, i: int) -> dict:
        v = prepared.values
        lo, hi = v.indptr[i], v.indptr[i + 1]
        extra = prepared.extra[i]
        keep = extra > 0
        return {"input_ids": np.concatenate([v.indices[lo:hi].astype(np.int64), self.extra_ids[keep]]),
                "values": np.concatenate([v.data[lo:hi], extra[keep]])}

    def lengths(self, prepared: Prepared) -> np.ndarray:
        return np.diff(prepared.values.indptr) + (prepared.extra > 0).sum(axis=1)


def match_genes(index: list[str], symbols) -> list[tuple[int, int]]:
    """(source column, index gene) pairs: exact symbol first, then ignoring case; each side used once."""
    exact = {g: k for k, g in enumerate(index)}
    folded = {g.upper(): k for k, g in enumerate(index)}
    symbols = [str(s) for s in symbols]
    pairs, taken, used = [], set(), set()
    for table, key in ((exact, str), (folded, str.upper)):
        for col, sym in enumerate(symbols):
            k = table.get(key(sym))
            if k is not None and k not in taken and col not in used:
                taken.add(k)
                used.add(col)
                pairs.append((col, k))
    return pairs


# -- backbone --------------------------------------------------------------------------------
@register
class ScFoundation(TorchBackbone):
    name = "scfoundation"
    summary = "scFoundation (xTrimoGene, auto-binned values); [S, T, max, mean] of the encoder"
    default_dim = "3072 (768 with pool=max)"
    requires = ("torch",)
    default_batch_size = 16
    options = {
        **TorchBackbone.options,
        "entry": Option("cell", "models.ckpt entry: cell (official cell embedding), rde or gene"),
        "target": Option("t4", "T token as the official --tgthighres: tN, fN or aN"),
        "pool": Option("all", "all: [S, T, max, mean] (4 x hidden); max: max over all tokens (hidden)"),
        "gene_index": Option("", f"the gene list (default: {GENE_INDEX} beside models.ckpt)"),
        "weights_only": Option(True, "false: full unpickling of models.ckpt (only for a file you trust)", bool),
    }

    # LoRA targets (``scdrugmap finetune``): the encoder's attention and feed-forward projections
    # (the performer decoder is never run)
    lora_attention = (r"encoder\.transformer_encoder\.\d+\.self_attn\.(in_proj|out_proj)",)
    lora_mlp = (r"encoder\.transformer_encoder\.\d+\.linear[12]",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config["entry"] not in ENTRIES:
            raise UserError(f"--option entry must be one of {', '.join(ENTRIES)}")
        if self.config["pool"] not in POOLS:
            raise UserError(f"--option pool must be one of {', '.join(POOLS)}")
        self.target = parse_target(self.config["target"])
        self.ckpt_path = self._checkpoint_path(Path(self.model_dir))
        self.index_path = Path(self.config["gene_index"]) if self.config["gene_index"] \
            else self.ckpt_path.parent / GENE_INDEX
        if not self.index_path.is_file():
            raise UserError(f"gene index {self.index_path} not found: put the release's {GENE_INDEX} beside "
                            f"{CHECKPOINT} or pass --option gene_index=FILE")
        self.gene_index = read_gene_index(self.index_path)
        self.cfg, self.model = self._load()
        if self.cfg.seq_len != len(self.gene_index) + 2:
            raise UserError(f"the checkpoint's seq_len is {self.cfg.seq_len}, but {self.index_path.name} lists "
                            f"{len(self.gene_index)} genes (seq_len = genes + 2): use the model's gene index")
        self.pad_id = self.cfg.seq_len                 # padding position (official getEncoerDecoderData)
        self.pad_values = {"values": float(self.cfg.pad_id)}
        self._matched: dict = {}
        self._sha256 = None

    @staticmethod
    def _checkpoint_path(path: Path) -> Path:
        if path.is_file():
            return path
        if not path.exists():
            raise UserError(f"--model-dir {path} does not exist: give the folder of scFoundation's {CHECKPOINT}")
        if not (path / CHECKPOINT).is_file():
            raise UserError(f"{path} has no {CHECKPOINT}: put the release's {CHECKPOINT} there "
                            "(and its gene index beside it)")
        return path / CHECKPOINT

    def _load(self):
        import pickle

        import torch

        try:
            data = torch.load(self.ckpt_path, map_location="cpu", weights_only=self.config["weights_only"])
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found:
                raise UserError(f"torch's safe loader refuses {self.ckpt_path}: it holds a {found[1]} object; "
                                "if you trust the file, pass --option weights_only=false") from None
            raise UserError(f"cannot read {self.ckpt_path}: not a torch checkpoint, or a damaged one") from None
        except Exception as e:
            raise UserError(f"cannot read {self.ckpt_path}: {type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]}") from None
        entry = self.config["entry"]
        where = f"{self.ckpt_path.name} entry {entry!r}"
        if not isinstance(data, dict) or entry not in data:
            have = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{self.ckpt_path} has no {entry!r} entry (it has: {have or 'nothing'}): "
                            "is it scFoundation's models.ckpt?")
        item = data[entry]
        if not isinstance(item, dict) or "config" not in item or "state_dict" not in item:
            raise UserError(f"{where} is not a {{config, state_dict}} dict: is it scFoundation's models.ckpt?")
        cfg = Config.from_entry(item["config"], where)
        # the official convertconfig keeps what follows "model." in each key
        state = {(k[len("model."):] if str(k).startswith("model.") else str(k)): v
                 for k, v in item["state_dict"].items()}
        del data, item
        model = build_model(cfg)
        check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, where)
        model.load_state_dict(state, strict=True, assign=True)
        return cfg, model.float().to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.cfg.hidden * (4 if self.config["pool"] == "all" else 1)

    def checkpoint_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_files([self.ckpt_path])
        return self._sha256

    # -- tokenisation ----------------------------------------------------------------------
    def matching(self, source):
        if source.name not in self._matched:
            symbols = source.symbols(upper=False)
            pairs = match_genes(self.gene_index, symbols)
            if len(pairs) < max(1, MIN_MATCHED * len(symbols)):
                raise UserError(f"dataset {source.name!r}: only {len(pairs)} of {len(symbols)} genes are in "
                                f"scFoundation's gene index ({self.index_path.name}): check that var holds "
                                "human gene symbols (or --symbol-col at ingest)")
            cols, genes = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
            exact = int(sum(str(symbols[c]) == self.gene_index[g] for c, g in pairs))
            align = sp.csr_matrix((np.ones(len(cols)), (cols, genes)), shape=(len(symbols), len(self.gene_index)))
            self._matched[source.name] = (align, len(pairs), exact)
        return self._matched[source.name]

    def cell_tokenizer(self, source) -> ScFoundationTokenizer:
        return ScFoundationTokenizer(self.matching(source)[0], self.target)

    # -- pooling ---------------------------------------------------------------------------
    def pool(self, input_ids, attention_mask, values):
        real = attention_mask.bool()
        hidden = encode(self.model, values, input_ids, real, self.cfg)
        return pool_hidden(hidden, real, self.config["pool"])

    def dataset_params(self, source) -> dict:
        _, matched, exact = self.matching(source)
        return {"genes_matched": matched, "genes_matched_ignoring_case": matched - exact}

    def params(self) -> dict:
        c = self.cfg
        return {**super().params(), "entry": self.config["entry"], "target": self.config["target"],
                "pool": self.config["pool"],
                "pooling": "[S, T, max, mean over genes]" if self.config["pool"] == "all" else "max over all tokens",
                "normalisation": "log1p(counts / total over the gene index's genes * 1e4)",
                "gene_index_sha256": sha256_files([self.index_path]), "gene_index_size": len(self.gene_index),
                "hidden": c.hidden, "depth": c.depth, "heads": c.heads, "seq_len": c.seq_len,
                "bin_num": c.bin_num, "tokens": "genes with value > 0 in index order, then T, S if > 0"}
