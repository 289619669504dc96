"""The torch extraction engine shared by every neural backbone.

A :class:`TorchBackbone` says how to turn one cell into token ids and how to pool a
padded batch into cell embeddings; the engine does the rest, the same way for every model:

* length-aware batching: the cells of a store chunk are sorted by token count and cut into
  batches, so padding stays small (the padding fraction is measured in the benchmark);
* tokenisation in ``DataLoader`` workers (``--option workers=N``), one batch per item
  (:meth:`CellTokenizer.tokens_many`, padded from the batch's ragged tokens), pinned memory and
  non-blocking copies on CUDA;
* ``torch.inference_mode``, bf16 autocast on CUDA (``--option precision=fp32|bf16|fp16``),
  PyTorch SDPA attention where the architecture has it;
* rows come back in the store's order, whatever the batch order was; a cell's embedding does
  not depend on the batch it is in (tested), unless a backbone's option asks for an official
  computation that does (the Performers' ``key_max=batch``, which then batches consecutive
  store cells through :meth:`TorchBackbone.batches`).

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from .registry import Backbone, Option

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def sha256_files(paths) -> str:
    """One digest over the given files' bytes (in order): the checkpoint's identity in provenance."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(spec) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id resolved through the HF cache."""
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model-dir {path} is a file: point it at the checkpoint's directory")
        return path
    text = str(spec)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise UserError(f"--model-dir {text} does not exist (give a checkpoint directory or a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise UserError(f"--model-dir {text} is not a directory and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id=text))
    except LocalEntryNotFoundError:
        raise UserError(f"hub model {text!r} is not in the Hugging Face cache and the hub cannot be reached: "
                        "download it on a connected machine, or pass a local --model-dir") from None
    except RepositoryNotFoundError:
        raise UserError(f"hub model {text!r} does not exist (or needs a login): check the id") from None
    except Exception as e:  # network errors come in many types
        raise UserError(f"cannot fetch hub model {text!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                        "pass a local --model-dir") from None


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or load chatter from transformers: our own output stays readable and a
    user error stays one line."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_strict(model_cls, model_dir: Path, what: str, **kwargs):
    """``model_cls.from_pretrained`` that refuses a checkpoint with missing or mis-sized weights
    (transformers would otherwise initialise them randomly and carry on)."""
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(model_dir, attn_implementation="sdpa", output_loading_info=True,
                                                    **kwargs)
    except Exception as e:
        raise UserError(f"cannot load the {what} checkpoint in {model_dir}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    missing = [k for k in info["missing_keys"] if "position_ids" not in k]
    bad = missing + [str(m[0]) for m in info["mismatched_keys"]]
    if bad:
        raise UserError(f"the checkpoint in {model_dir} lacks or mis-sizes {len(bad)} weights "
                        f"(e.g. {', '.join(bad[:3])}): is it a {what} checkpoint ({model_cls.__name__})?")
    return model


def key_mismatches(state: dict, expected: dict) -> str:
    """Why ``state`` would not load strictly into a model whose weights are ``expected`` (name ->
    shape), in one readable clause naming a few keys of each kind; empty when it would."""
    shape = {k: tuple(getattr(v, "shape", ("not a tensor",))) for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    missized = [f"{k} {shape[k]}, expected {tuple(expected[k])}" for k in expected
                if k in state and shape[k] != tuple(expected[k])]
    return "; ".join(f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
                     (("missing", missing), ("unexpected", unexpected), ("mis-sized", missized)) if v)


def weights_file(model_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise UserError(f"{model_dir} has no model.safetensors or pytorch_model.bin: "
                    "point --model-dir at the checkpoint directory")


class TorchBackbone(Backbone):
    """Base of the neural backbones: subclasses set up ``self.model`` and the two hooks below."""

    requires = ("torch", "transformers")
    extra = "extract"
    needs_weights = True
    default_batch_size = 32
    options = {
        "precision": Option("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16"),
        "workers": Option(0, "DataLoader workers that tokenise cells", int),
    }

    pad_id: int = 0
    # Per-token inputs beside the ids (e.g. scGPT's binned values): name -> padding value.
    # A tokenizer returning a dict ``{"input_ids": ..., name: ...}`` gets them padded and
    # passed to :meth:`pool` as keyword arguments.
    pad_values: dict = {}

    # -- hooks ---------------------------------------------------------------------------
    def cell_tokenizer(self, source) -> "CellTokenizer":
        """For one dataset: what turns a row of a CSR block of counts into token ids."""
        raise NotImplementedError

    def pool(self, input_ids, attention_mask, **inputs):
        """A padded batch (right padding) -> ``(batch, dim)`` cell embeddings (a torch tensor);
        ``inputs`` holds the padded per-token inputs named in :attr:`pad_values`."""
        raise NotImplementedError

    # -- fine-tuning (``scdrugmap finetune``) ------------------------------------------------
    # Default LoRA targets: regular expressions, each matched against the end of the dotted names
    # of ``self.model``'s modules, from a name boundary on (``query`` matches
    # ``encoder.layer.0.attention.self.query``). Only modules that the forward pass of
    # :meth:`finetune_embed` *calls* may be named: peft's LoRA layer replaces the module, so a
    # weight read functionally (``F.linear(x, m.weight)``, or ``nn.MultiheadAttention``'s fused
    # path) would never see the adapter. The gradient check of :mod:`scdrugmap.finetune.adapters`
    # proves the defaults for every registered backbone (tests/finetune).
    lora_attention: tuple = ()    # attention projections (``--target-modules attention``, the default)
    lora_mlp: tuple = ()          # feed-forward layers (``--target-modules mlp``)
    finetune_batch_size: int | None = None   # cells per training step (default: default_batch_size)

    def lora_unused(self) -> tuple:
        """Module-name prefixes of ``self.model`` whose output never reaches the embedding (e.g.
        layers after the pooled one): left out of the default targets, since their adapters could
        not learn anything."""
        return ()

    def finetune_cells(self, source, block: sp.csr_matrix):
        """The cells of ``block`` ready for training: item ``i`` is ``(i, inputs)``, and
        ``lengths()`` gives every cell's token count (for length-aware batching)."""
        return _CellTokens(block, self.cell_tokenizer(source))

    def finetune_collate(self):
        """Collates items of :meth:`finetune_cells` into a batch for :meth:`finetune_embed`."""
        return _Pad(self.pad_id, self.pad_values)

    def finetune_embed(self, batch):
        """A collated batch -> ``(batch, dim)`` cell embeddings, the same computation as extraction
        (:meth:`pool`) but differentiable: the caller decides on ``torch.no_grad`` and autocast."""
        _, ids, mask, inputs = batch
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        return self.pool(ids, mask, **inputs)

    # -- engine --------------------------------------------------------------------------
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: use cpu or cuda")
        if str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda, but torch sees no CUDA device: install the CUDA build of torch "
                                "or use --device cpu")
        if self.config["precision"] not in PRECISIONS:
            raise UserError(f"--option precision must be one of {', '.join(PRECISIONS)}")
        self.batch_size = self.batch_size or self.default_batch_size
        self.padding_stats = [0, 0]   # padded positions, all positions, over every batch so far (benchmark)

    @property
    def precision(self) -> str:
        p = self.config["precision"]
        return ("bf16" if self.on_cuda else "fp32") if p == "auto" else p

    @property
    def on_cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda" if self.on_cuda else "cpu", dtype=dtype)

    def encoder(self, source):
        tokenizer = self.cell_tokenizer(source)

        def encode(block: sp.csr_matrix) -> np.ndarray:
            return self.embed_block(block, tokenizer)

        return encode

    def token_batches(self, block: sp.csr_matrix, tokenizer: "CellTokenizer") -> "_TokenBatches":
        """The CPU side of :meth:`embed_block`: the block prepared once, its batches formed from the
        token counts; item ``k`` is batch ``k`` tokenised (:meth:`CellTokenizer.tokens_many`, in a
        DataLoader worker) and padded, ``(index, input_ids, attention_mask, inputs)``."""
        cells = _CellTokens(block, tokenizer)
        return _TokenBatches(cells, self.batches(cells.lengths()), _Pad(self.pad_id, self.pad_values))

    def embed_block(self, block: sp.csr_matrix, tokenizer: "CellTokenizer") -> np.ndarray:
        import torch
        from torch.utils.data import DataLoader

        batches = self.token_batches(block, tokenizer)
        loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.config["workers"],
                            pin_memory=self.on_cuda)
        out = np.empty((block.shape[0], self.dim), dtype=np.float32)
        with torch.inference_mode(), self.autocast():
            for index, ids, mask, inputs in loader:
                ids = ids.to(self.device, non_blocking=True)
                mask = mask.to(self.device, non_blocking=True)
                inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
                emb = self.pool(ids, mask, **inputs)
                out[index.numpy()] = emb.float().cpu().numpy()
                self.padding_stats[0] += int(mask.numel() - mask.sum())
                self.padding_stats[1] += int(mask.numel())
        return out

    def batches(self, lengths: np.ndarray) -> list[list[int]]:
        """The batches (lists of row indices) that :meth:`embed_block` runs one block of cells in,
        given every cell's token count; default: :func:`length_sorted_batches`."""
        return length_sorted_batches(lengths, self.batch_size)

    def params(self) -> dict:
        return {**super().params(), "precision": self.precision, "batch_size": self.batch_size,
                "batching": "length-sorted within each store chunk, right padding"}


def official_in_proj_names(module) -> None:
    """Store and load ``module.in_proj`` (an ``nn.Linear`` holding the packed q, k, v projection)
    under ``nn.MultiheadAttention``'s names ``in_proj_weight`` / ``in_proj_bias``.

    The released scGPT, scFoundation and UCE checkpoints use those names. Holding the projection
    as a module, not as two parameters read with ``F.linear``, lets LoRA (peft) wrap it: an
    adapter on a weight that is read functionally never receives a gradient."""
    renames = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))

    def saved(mod, state, prefix, local_metadata):
        for ours, official in renames:
            if prefix + ours in state:
                state[prefix + official] = state.pop(prefix + ours)

    def loading(mod, state, prefix, local_metadata, strict, missing, unexpected, errors):
        for ours, official in renames:
            if prefix + official in state:
                state[prefix + ours] = state.pop(prefix + official)

    module.register_state_dict_post_hook(saved)
    module.register_load_state_dict_pre_hook(loading)


def masked_mean(hidden, mask):
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def without_ends(attention_mask):
    """The mask less each sequence's first and last attended token (start/end special tokens)."""
    mask = attention_mask.clone()
    mask[:, 0] = 0
    mask[range(len(mask)), attention_mask.sum(1) - 1] = 0
    return mask


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches of cells of similar token count (longest first), so little of a batch is padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def consecutive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Batches of consecutive cells in store order, ``[0, batch_size)``, ``[batch_size, 2 *
    batch_size)``, ...; the last one may be shorter (a ``DataLoader`` with ``shuffle=False``)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class CellTokenizer:
    """One dataset's tokenisation of a CSR block of counts (cells x source genes).

    ``prepare`` runs once per block (vectorised work: normalisation, gene mapping);
    ``lengths`` gives every cell's token count without tokenising, so batches can be formed
    first; ``tokens_many`` runs per batch, in the DataLoader workers, and must equal ``tokens``
    (one cell, the straightforward reference) of each of its cells (tests/extract/test_token_batches.py).
    """

    def prepare(self, block: sp.csr_matrix):
        return sp.csr_matrix(block)

    def tokens(self, prepared, i: int):
        """Token ids (an int array), or a dict of equally long arrays with ``input_ids`` and the
        backbone's other per-token inputs."""
        raise NotImplementedError

    def lengths(self, prepared) -> np.ndarray:
        return np.array([len(_ids(self.tokens(prepared, i))) for i in range(prepared.shape[0])])

    def tokens_many(self, prepared, rows) -> "Ragged":
        """The tokens of the cells ``rows``, all at once: exactly :meth:`tokens` of each, in order.
        Backbones override it with block arithmetic (one sort per batch, no per-cell Python where
        the tokenisation allows); this default runs :meth:`tokens` per cell."""
        return Ragged.of([self.tokens(prepared, int(i)) for i in rows])


def with_ends(counts: np.ndarray, body: np.ndarray, first: int, last: int):
    """Each cell's ``counts[k]`` tokens of ``body`` (end to end) between ``first`` and ``last``:
    ``(lengths, ids)``."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = counts + 2
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out[starts] = first
    out[starts + lengths - 1] = last
    inner = np.ones(len(out), dtype=bool)
    inner[starts] = False
    inner[starts + lengths - 1] = False
    out[inner] = body
    return lengths, out


class Ragged:
    """Several cells' tokens end to end: ``lengths[k]`` positions of cell ``k``, and per input name
    (``input_ids`` and a backbone's :attr:`TorchBackbone.pad_values`) one flat array."""

    def __init__(self, lengths, arrays: dict):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.arrays = {k: np.asarray(v, dtype=np.int64 if k == "input_ids" else np.float32)
                       for k, v in arrays.items()}

    @classmethod
    def of(cls, cells: list) -> "Ragged":
        """From a list of per-cell outputs of :meth:`CellTokenizer.tokens`."""
        cells = [c if isinstance(c, dict) else {"input_ids": c} for c in cells]
        names = list(cells[0]) if cells else ["input_ids"]
        return cls([len(c["input_ids"]) for c in cells],
                   {k: np.concatenate([np.asarray(c[k]) for c in cells]) if cells else np.zeros(0) for k in names})

    def cell(self, k: int) -> dict:
        lo = int(self.lengths[:k].sum())
        return {name: a[lo:lo + self.lengths[k]] for name, a in self.arrays.items()}

    @staticmethod
    def offsets(lengths) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class _CellTokens:
    """A map-style dataset over the rows of one block: item ``i`` is ``(i, token ids)``."""

    def __init__(self, block: sp.csr_matrix, tokenizer: CellTokenizer):
        self.prepared = tokenizer.prepare(block)
        self.n = block.shape[0]
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.n

    def lengths(self) -> np.ndarray:
        return np.asarray(self.tokenizer.lengths(self.prepared))

    def __getitem__(self, i: int):
        tokens = self.tokenizer.tokens(self.prepared, i)
        if isinstance(tokens, dict):
            return i, {k: np.asarray(v, dtype=np.int64 if k == "input_ids" else np.float32)
                       for k, v in tokens.items()}
        return i, {"input_ids": np.asarray(tokens, dtype=np.int64)}


def _ids(tokens):
    return tokens["input_ids"] if isinstance(tokens, dict) else tokens


class _TokenBatches:
    """Map-style dataset over the batches of one block: item ``k`` is batch ``k``, tokenised and padded."""

    def __init__(self, cells: _CellTokens, batches: list, pad: "_Pad"):
        self.cells, self.batches, self.pad = cells, batches, pad

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        rows = np.asarray(self.batches[k], dtype=np.int64)
        return self.pad.ragged(rows, self.cells.tokenizer.tokens_many(self.cells.prepared, rows))


class _Pad:
    """Collate ``(index, tokens)`` items into right-padded ``input_ids``, ``attention_mask`` and
    the other per-token inputs (each padded with its own value)."""

    def __init__(self, pad_id: int, pad_values: dict | None = None):
        self.pad_id = pad_id
        self.pad_values = pad_values or {}

    def __call__(self, items):
        import torch

        index = torch.tensor([i for i, _ in items])
        width = max(max(len(t["input_ids"]) for _, t in items), 1)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        inputs = {name: torch.full((len(items), width), float(value), dtype=torch.float32)
                  for name, value in self.pad_values.items()}
        for row, (_, tokens) in enumerate(items):
            n = len(tokens["input_ids"])
            ids[row, :n] = torch.from_numpy(tokens["input_ids"])
            mask[row, :n] = 1
            for name in inputs:
                inputs[name][row, :n] = torch.from_numpy(tokens[name])
        return index, ids, mask, inputs

    def ragged(self, rows: np.ndarray, tokens: Ragged):
        """The same padded batch as ``__call__`` over the cells' items, from their :class:`Ragged` tokens."""
        import torch

        n = tokens.lengths
        width = max(int(n.max()) if len(n) else 0, 1)
        mask = np.arange(width)[None, :] < n[:, None]
        ids = np.full((len(n), width), self.pad_id, dtype=np.int64)
        ids[mask] = tokens.arrays["input_ids"]
        inputs = {}
        for name, value in self.pad_values.items():
            a = np.full((len(n), width), float(value), dtype=np.float32)
            a[mask] = tokens.arrays[name]
            inputs[name] = torch.from_numpy(a)
        return (torch.from_numpy(np.asarray(rows, dtype=np.int64)), torch.from_numpy(ids),
                torch.from_numpy(mask.astype(np.int64)), inputs)
