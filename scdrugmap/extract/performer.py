"""The Performer encoder of scBERT and cellLM, and what the two backbones share.

Both models are the ``PerformerLM`` of the performer-pytorch package as vendored by their
authors: scBERT in github.com/TencentAILabHealthcare/scBERT
(``performer_pytorch/performer_pytorch.py``) and cellLM in github.com/PharMolix/OpenBioMed
(``open_biomed/models/cell/performer_celllm.py::PerformerLM_CellLM``). Their attention code is the
same; only the inputs differ (scBERT: one token per reference gene at position = gene index;
cellLM: the nonzero genes after a CLS token, each at its gene's row of the positional table).
This module is a re-implementation, written for inference only, whose ``state_dict`` names are
the official ones so that the released ``model_state_dict`` loads unchanged:

* ``token_emb`` (``nn.Embedding(num_tokens, dim)``); ``pos_emb.emb`` (the gene2vec table, kept in
  float64 as the official ``Gene2VecPositionalEmbedding`` builds it from a numpy array);
  ``performer.net.layers.{i}.0`` = ``PreLayerNorm(SelfAttention)`` with ``norm``, ``fn.to_q``,
  ``fn.to_k``, ``fn.to_v`` (no bias: ``qkv_bias=False``), ``fn.to_out`` (with bias) and the
  buffer ``fn.fast_attention.projection_matrix`` (``nb_features`` x ``dim_head``);
  ``performer.net.layers.{i}.1`` = ``PreLayerNorm(Chunk(FeedForward))`` with ``norm``,
  ``fn.fn.w1``, ``fn.fn.w2``; the buffer ``performer.calls_since_last_redraw``; the final
  ``norm`` and the masked-LM head ``to_out`` (loaded, never run).
* **embedding sum** (``PerformerLM.forward``): ``x = token_emb(tokens); x += pos_emb(...)``, an
  in-place float32 += float64 add: PyTorch computes it in float64 and rounds to float32. The same
  in-place add is done here (not a float32 add of a rounded table), so the input is bit-identical.
* **layers** (``SequentialSequence``, ``PreLayerNorm``, ``FeedForward``): ``x = x + attn(LN1(x))``,
  ``x = x + w2(GELU(w1(LN2(x))))`` (exact GELU), then the final ``norm``; dropouts are 0.
* **attention** (``SelfAttention``, ``FastAttention``, ``softmax_kernel``, ``linear_attention``):
  FAVOR+ positive random features with the softmax kernel, non-causal. With ``c = d^-1/4`` (``d`` =
  ``dim_head``), ``m`` = ``nb_features`` and ``P`` the projection matrix:
  ``f(x) = m^-1/2 (exp(c x P^T - c^2 |x|^2 / 2 - stab) + 1e-4)``; ``stab`` is the row maximum of
  ``c x P^T`` for queries and, officially, **one maximum over the whole key tensor** (batch,
  heads, positions, features) for keys. Then ``out_i = f(q_i) (sum_j f(k_j) v_j^T) /
  (f(q_i) . sum_j f(k_j))``.
* **no redraw**: ``Performer.check_redraw_projections`` returns at once in ``eval()``, so the
  stored ``projection_matrix`` of the checkpoint is used; here nothing is ever redrawn.

Deviations from the official code, each chosen so that a cell's embedding does not depend on the
batch it lands in (tested):

* **key maximum per cell** (``--option key_max=cell``, the default): the official key-side
  maximum is taken over the whole batch tensor (``torch.max(data_dash)`` in the copies vendored by
  both releases; performer-pytorch 1.1.1 and later take it per cell and head instead), so through
  the ``1e-4`` term a cell's output moves with the other cells of its batch. Here the maximum is
  taken over one cell's keys (all heads, positions and features), which is exactly what the
  official code computes for a batch of one cell (scBERT's ``predict.py`` runs one cell at a
  time). ``--option key_max=batch`` gives the official batched computation instead, over batches
  of consecutive store cells (:class:`PerformerBackbone`; tested against a plain-torch official
  forward). How far the two differ was measured with ``benchmarks/key_max_bench.py`` (random
  weights at the released shapes, real PC9 cells, fp32; 2-core Intel Xeon, torch 2.13 CPU), as
  the change of ``key_max=batch`` from ``key_max=cell`` in % of the embedding's L2 norm, per cell
  (min / median / max), and the centred cosine (each set centred by its mean over the cells):

  * cellLM (512-d, 10 layers, ``max_seq_len`` 6,000; 32 cells, median 841 tokens): batch 4
    0.12 / 0.45 / 0.89 %, batch 32 0.52 / 0.94 / 1.52 %; centred cosine at least 0.998 (largest
    coordinate change 0.031 and 0.053, coordinates up to 3.7);
  * scBERT (200-d, 6 layers, 16,907 tokens; 8 cells): batch 4 0.00 / 0.03 / 0.11 %, batch 8
    0.00 / 0.04 / 0.12 %; centred cosine at least 0.9999.

  So for cellLM a batched official run differs from ``key_max=cell`` by about 0.5% (batch 4) to
  1% (batch 32) of the norm in the median, an order of magnitude more than for scBERT. The size
  with the released weights is not measured here.
* **key weights**: each position carries a key weight ``w_j``: sums over keys are
  ``sum_j w_j f(k_j)`` and ``sum_j w_j f(k_j) v_j``, and positions with ``w_j = 0`` (the engine's
  right padding) are left out of the key maximum. With ``w_j = 1`` this is the official formula;
  cellLM uses a weight above 1 to stand for its identical padding positions (see ``celllm``).
* **value mask** (cellLM's ``mask``): officially only ``v.masked_fill_(~mask, 0)``; padded keys
  are not masked. The same is done here.
* **precision**: the projections run under the engine's autocast (bf16 on CUDA by default);
  the feature maps and the linear-attention sums always run in float32 (the official code runs
  fp32 throughout).

Also here, shared by ``scbert`` and ``celllm``: reading ``{'model_state_dict': ...}`` checkpoints,
strict key checking, reading gene lists, matching source genes to the model's gene order, and
the scBERT preprocessing (normalise the total to 10,000, log2(1 + x), bins ``floor(min(x, cap))``).

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from .engine import TorchBackbone, consecutive_batches, key_mismatches
from .registry import Option

KERNEL_EPS = 1e-4          # softmax_kernel(eps=1e-4)
# the key maximum of the softmax kernel: over one cell's (heads, positions, features), or over the
# whole batch tensor as the official torch.max(data_dash)
KEY_MAX_DIMS = {"cell": (1, 2, 3), "batch": (0, 1, 2, 3)}
# LoRA targets of both backbones (``scdrugmap finetune``): every projection is called as a module
LORA_ATTENTION = (r"layers\.\d+\.0\.fn\.to_(q|k|v|out)",)
LORA_MLP = (r"layers\.\d+\.1\.fn\.fn\.w[12]",)
TARGET_SUM = 1e4           # sc.pp.normalize_total(target_sum=1e4)
MIN_MATCHED = 0.05         # refuse a dataset when fewer than 5% of the genes that could match do


def default_nb_features(dim_head: int) -> int:
    """``FastAttention``: ``nb_features = int(dim_heads * log(dim_heads))`` (266 for 64)."""
    return int(dim_head * math.log(dim_head))


@dataclass(frozen=True)
class PerformerSizes:
    """Everything that sets a ``PerformerLM`` state dict's shapes."""

    num_tokens: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    nb_features: int
    ff_hidden: int           # dim * ff_mult
    pos_rows: int            # rows of the gene2vec positional table

    def as_dict(self) -> dict:
        return asdict(self)


# ---- what the two backbones share ----------------------------------------------------------
@dataclass
class Choice(Option):
    """An option whose value must be one of ``choices``."""

    choices: tuple = ()

    def check(self, name: str, value):
        if value not in self.choices:
            raise UserError(f"--option {name}={value!r}: use one of {', '.join(self.choices)}")
        return value


class PerformerBackbone(TorchBackbone):
    """Base of ``scbert`` and ``celllm``: the ``key_max`` option and the batching it implies.

    ``key_max=cell`` (default): the kernel's key maximum per cell; batches are the engine's
    (length-sorted within a store chunk) and do not change an embedding. ``key_max=batch``: the
    official batched computation, one maximum over each batch; the batches are then what an
    official run over the dataset in store order makes (``DataLoader(batch_size=B,
    shuffle=False)``): cells ``[0, B)``, ``[B, 2B)``, ... of the dataset, the last one shorter.
    The engine cuts them from each store chunk's first cell, so ``--chunk-rows`` must be a
    multiple of ``B`` (checked). Extraction only: ``scdrugmap finetune`` forms its own batches,
    so it refuses ``key_max=batch``."""

    options = {
        **TorchBackbone.options,
        "key_max": Choice("cell", "the softmax kernel's key maximum: cell (one per cell, so an embedding does not "
                                  "depend on its batch; = the official forward on one cell) or batch (one per batch "
                                  "of --batch-size consecutive store cells, as an official batched run; --chunk-rows "
                                  "must be a multiple of --batch-size)", choices=("cell", "batch")),
    }

    @property
    def key_max(self) -> str:
        return self.config["key_max"]

    def batches(self, lengths) -> list[list[int]]:
        if self.key_max == "batch":
            return consecutive_batches(len(lengths), self.batch_size)
        return super().batches(lengths)

    def check_chunk_rows(self, chunk_rows: int) -> None:
        b = self.batch_size
        if self.key_max == "batch" and chunk_rows % b:
            raise UserError(f"--option key_max=batch forms official batches of {b} consecutive cells, cut from each "
                            f"store chunk's first cell: --chunk-rows {chunk_rows} is not a multiple of --batch-size "
                            f"{b}, so a batch would be split at a chunk's end; give --chunk-rows "
                            f"{max(b, chunk_rows // b * b)}")

    def finetune_cells(self, source, block):
        if self.key_max == "batch":
            raise UserError("--option key_max=batch is for extraction (official batches of consecutive store cells); "
                            "fine-tuning forms its own batches: leave key_max at its default, cell")
        return super().finetune_cells(source, block)

    def key_max_params(self, per_cell: str) -> dict:
        """Provenance of the key maximum (``per_cell``: how the default is described) and, for
        ``key_max=batch``, of the batches that share one."""
        if self.key_max == "cell":
            return {"key_max": per_cell}
        b = self.batch_size
        return {"key_max": f"per batch (official torch.max over the batch's keys): one maximum per batch of {b} "
                           "consecutive store cells",
                "batching": f"store order: cells [0, {b}), [{b}, {2 * b}), ... of the dataset share a batch (an "
                            "official DataLoader with shuffle=False), right padding"}


# ---- the model ------------------------------------------------------------------------------
def build_performer(sizes: PerformerSizes):
    """A ``PerformerLM`` with the official state-dict names (see the module docstring)."""
    import torch
    from torch import nn

    class FastAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("projection_matrix", torch.zeros(sizes.nb_features, sizes.dim_head))

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            inner = sizes.heads * sizes.dim_head
            self.fast_attention = FastAttention()
            self.to_q = nn.Linear(sizes.dim, inner, bias=False)
            self.to_k = nn.Linear(sizes.dim, inner, bias=False)
            self.to_v = nn.Linear(sizes.dim, inner, bias=False)
            self.to_out = nn.Linear(inner, sizes.dim)

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(sizes.dim, sizes.ff_hidden)
            self.w2 = nn.Linear(sizes.ff_hidden, sizes.dim)

        def forward(self, x):
            return self.w2(torch.nn.functional.gelu(self.w1(x)))

    class Wrapped(nn.Module):           # Chunk(1, fn) has no weights of its own
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

    class PreNorm(nn.Module):           # PreLayerNorm
        def __init__(self, fn):
            super().__init__()
            self.norm = nn.LayerNorm(sizes.dim)
            self.fn = fn

    class Net(nn.Module):               # SequentialSequence
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleList([PreNorm(SelfAttention()), PreNorm(Wrapped(FeedForward()))])
                                         for _ in range(sizes.depth)])

    class Performer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()
            self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    class PositionTable(nn.Module):     # Gene2VecPositionalEmbedding
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(sizes.pos_rows, sizes.dim, dtype=torch.float64)

    class PerformerLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_emb = nn.Embedding(sizes.num_tokens, sizes.dim)
            self.pos_emb = PositionTable()
            self.performer = Performer()
            self.norm = nn.LayerNorm(sizes.dim)
            self.to_out = nn.Linear(sizes.dim, sizes.num_tokens)
            self.sizes = sizes

        def forward(self, tokens, positions, key_weight, value_mask=None, key_max: str = "cell"):
            return encode(self, tokens, positions, key_weight, value_mask, key_max)

    model = PerformerLM()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def feature_map(x, projection, is_query: bool, live=None, key_max: str = "cell"):
    """``softmax_kernel`` on ``x`` (batch, heads, n, dim_head), in float32. Queries: row maximum.
    Keys: with ``key_max="cell"`` one maximum per cell over its heads, positions where ``live``
    (batch, n) is true, and features; with ``"batch"`` one maximum over all of that for the whole
    batch tensor (the official ``torch.max(data_dash)``)."""
    import torch

    x = x.float()
    c = x.shape[-1] ** -0.25
    dash = torch.einsum("bhnd,md->bhnm", c * x, projection.float())
    diag = (x * x).sum(-1, keepdim=True) / 2.0 * c ** 2
    if is_query:
        stab = dash.amax(-1, keepdim=True)
    else:
        padded = live is not None and not bool(live.all())
        masked = dash.masked_fill(~live[:, None, :, None], float("-inf")) if padded else dash
        stab = masked.amax(dim=KEY_MAX_DIMS[key_max], keepdim=True)
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))   # a cell with no live key
    return projection.shape[0] ** -0.5 * (torch.exp(dash - diag - stab) + KERNEL_EPS)


def fast_attention(q, k, v, projection, key_weight, key_max: str = "cell"):
    """Non-causal FAVOR+ attention (float32) with per-position key weights (batch, n); ``key_max``
    as in :func:`feature_map`."""
    import torch

    live = key_weight > 0
    qf = feature_map(q, projection, True)
    kf = feature_map(k, projection, False, live, key_max)
    if not bool(live.all()):                                                   # padding: 0, never inf * 0
        kf = torch.where(live[:, None, :, None], kf, torch.zeros_like(kf))
    if not bool((key_weight == 1).all()):
        kf = kf * key_weight.float()[:, None, :, None]
    k_sum = kf.sum(-2)                                                         # (b, h, m)
    context = torch.einsum("bhnm,bhne->bhme", kf, v.float())
    d_inv = 1.0 / torch.einsum("bhnm,bhm->bhn", qf, k_sum)
    return torch.einsum("bhme,bhnm,bhn->bhne", context, qf, d_inv)


def self_attention(attn, x, key_weight, value_mask=None, key_max: str = "cell"):
    """``SelfAttention.forward`` (global heads only: ``local_attn_heads=0``)."""
    import torch

    b, n, _ = x.shape
    heads = attn.to_q.out_features // attn.fast_attention.projection_matrix.shape[1]

    def split(t):                     # 'b n (h d) -> b h n d'
        return t.reshape(b, n, heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    if value_mask is not None:        # the official mask zeroes v only
        v = v.masked_fill(~value_mask[:, None, :, None], 0.0)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = fast_attention(q, k, v, attn.fast_attention.projection_matrix, key_weight, key_max)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return attn.to_out(out)


def encode(model, tokens, positions, key_weight, value_mask=None, key_max: str = "cell"):
    """The official forward up to and including the final ``norm``: (batch, n, dim). ``key_max``:
    ``"cell"`` (each cell as if alone in its batch) or ``"batch"`` (the official batched run)."""
    x = model.token_emb(tokens)
    x += model.pos_emb.emb(positions)              # float32 += float64, as the official in-place add
    for attn_block, ff_block in model.performer.net.layers:
        x = x + self_attention(attn_block.fn, attn_block.norm(x), key_weight, value_mask, key_max)
        x = x + ff_block.fn.fn(ff_block.norm(x))
    return model.norm(x)


# ---- checkpoints ----------------------------------------------------------------------------
def read_checkpoint(path: Path, what: str, param_key: str = "model_state_dict", trusted: bool = False) -> dict:
    """The state dict under ``param_key`` of a ``torch.save`` file (the whole file when
    ``param_key`` is empty), read without running pickled code unless ``trusted``."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:
        hint = ("" if trusted else "; if it is the release and you trust it, pass --option trust_checkpoint=true "
                "(full unpickling) or re-save its model_state_dict alone with torch.save")
        raise UserError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}){hint}") from None
    sd = (obj.get(param_key) if isinstance(obj, dict) else None) if param_key else obj
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        where = f"no {param_key} of tensors" if param_key else "no state dict of tensors"
        raise UserError(f"{path.name} has {where}: is it the {what} checkpoint?")
    return sd


def sizes_from_state(state: dict, path: Path, what: str) -> PerformerSizes:
    """The sizes a state dict was saved with (scBERT ships no config). Every key is then checked
    against the official layout for these sizes by :func:`check_state`."""
    need = ("token_emb.weight", "pos_emb.emb.weight", "performer.net.layers.0.0.fn.to_q.weight",
            "performer.net.layers.0.0.fn.fast_attention.projection_matrix", "performer.net.layers.0.1.fn.fn.w1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise UserError(f"{path.name} lacks {', '.join(missing[:3])}: is it the {what} checkpoint "
                        "(a Performer model_state_dict)?")
    try:
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("performer.net.layers."))
        num_tokens, dim = state["token_emb.weight"].shape
        nb_features, dim_head = state["performer.net.layers.0.0.fn.fast_attention.projection_matrix"].shape
        inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
        ff_hidden = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
        pos_rows = state["pos_emb.emb.weight"].shape[0]
    except (ValueError, IndexError):
        raise UserError(f"{path.name}: unexpected weight shapes for a {what} Performer checkpoint") from None
    if inner % dim_head:
        raise UserError(f"{path.name}: to_q has {inner} outputs, not a multiple of dim_head {dim_head}")
    return PerformerSizes(int(num_tokens), int(dim), depth, inner // dim_head, int(dim_head), int(nb_features),
                          int(ff_hidden), int(pos_rows))


def check_state(state: dict, model, path: Path, fix: str) -> None:
    """Refuse (one line) a state dict with a missing, unexpected or mis-sized key."""
    problems = key_mismatches(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise UserError(f"{path.name} does not match the official layout (strict loading): {problems}: {fix}")


def load_state(model, state: dict) -> None:
    """Copy a checked state dict (``pos_emb`` stays float64, the buffers are the checkpoint's)."""
    import torch

    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def find_file(folder: Path, given: str, patterns: tuple, what: str, fix: str, required: bool = True) -> Path | None:
    """``given`` (a path, or a name inside ``folder``), else the single file of ``folder`` matching
    one of ``patterns``."""
    if given:
        path = Path(given)
        if not path.is_absolute() and not path.exists():
            path = folder / given
        if not path.is_file():
            raise UserError(f"{what} {given}: no such file")
        return path
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(found) > 1:
        raise UserError(f"{folder} holds several {what}s ({', '.join(p.name for p in found)}): {fix}")
    if not found:
        if required:
            raise UserError(f"no {what} ({' or '.join(patterns)}) in {folder}: {fix}")
        return None
    return found[0]


def model_folder(spec, what: str, files: str) -> Path:
    folder = Path(spec)
    if not folder.is_dir():
        raise UserError(f"--model-dir {folder} is not a directory: point it at the folder holding {what}'s {files}")
    return folder


# ---- genes ----------------------------------------------------------------------------------
def read_gene_list(path: Path) -> tuple[str, ...]:
    """Gene symbols in the model's order: a text file (one symbol per line; for .tsv/.csv the
    first column; blank lines skipped) or an ``.h5ad`` file's ``var_names`` (scBERT's
    ``panglao_10000.h5ad``)."""
    path = Path(path)
    if path.suffix == ".h5ad":
        try:
            import anndata as ad

            adata = ad.read_h5ad(path, backed="r")
            genes = [str(g) for g in adata.var_names]
            adata.file.close()
        except Exception as e:
            raise UserError(f"cannot read the gene list from {path} ({type(e).__name__}): give the h5ad whose "
                            "var_names are the model's genes, or a text file with one symbol per line") from None
    else:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the gene list {path}: {type(e).__name__}") from None
        sep = "\t" if path.suffix == ".tsv" else "," if path.suffix == ".csv" else None
        genes = [(line.split(sep)[0] if sep else line).strip() for line in lines]
        genes = [g for g in genes if g]
    if not genes:
        raise UserError(f"gene list {path} is empty: give one gene symbol per line, in the model's gene order")
    return tuple(genes)


@dataclass
class GeneMatch:
    """A dataset's source columns placed at the model's gene positions."""

    select: sp.csr_matrix       # source genes x model genes, 1 where a model gene reads that column
    matched: int                # model genes found in the dataset
    source_genes: int

    @classmethod
    def build(cls, symbols, genes, dataset: str, model: str) -> "GeneMatch":
        """Exact, case-sensitive symbol match; a symbol present in several source columns reads
        the first (scBERT's ``preprocess.py``: ``obj.index(ref[i])``); absent genes stay 0."""
        first: dict = {}
        for c, s in enumerate(symbols):
            first.setdefault(str(s), c)
        pairs = [(first[g], i) for i, g in enumerate(genes) if g in first]
        need = max(1, MIN_MATCHED * min(len(symbols), len(genes)))
        if len(pairs) < need:
            raise UserError(f"dataset {dataset!r}: only {len(pairs)} of the {model} model's {len(genes)} genes "
                            f"are among its {len(symbols)} gene symbols (exact, case-sensitive match): check that "
                            "var holds human gene symbols (or --symbol-col at ingest) and that the gene list is the "
                            "model's")
        rows, cols = (np.array(v, dtype=np.int64) for v in zip(*pairs))
        select = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (rows, cols)), shape=(len(symbols), len(genes)))
        return cls(select, len(pairs), len(symbols))


def log2_normalised(block, select: sp.csr_matrix) -> sp.csr_matrix:
    """Cells x model genes: counts reordered to the model's genes, ``normalize_total(1e4)`` over
    those genes, then ``log1p(base=2)``, in float32 as scanpy 1.7.2 (scBERT's requirements) does:
    ``x = c * (1 / (total / 1e4))``, ``log1p(x) / log(2)``. Zero counts stay implicit; a cell
    whose total is 0 stays all zero (scanpy divides by 1 there)."""
    x = sp.csr_matrix(sp.csr_matrix(block, dtype=np.float32) @ select, dtype=np.float32)
    x.sum_duplicates()
    x.eliminate_zeros()
    x.sort_indices()
    totals = np.asarray(x.sum(axis=1, dtype=np.float32)).ravel().astype(np.float32)
    totals = totals + (totals == 0)
    scale = (np.float32(1.0) / (totals / np.float32(TARGET_SUM))).astype(np.float32)
    x.data = (x.data * np.repeat(scale, np.diff(x.indptr))).astype(np.float32)
    x.data = (np.log1p(x.data) / np.float32(np.log(2.0))).astype(np.float32)
    return x


def expression_bins(values: np.ndarray, cap: int) -> np.ndarray:
    """``x[x > cap] = cap; x.long()``: ``floor(min(x, cap))`` for the non-negative values."""
    return np.floor(np.minimum(values, np.float32(cap))).astype(np.int64)
