"""``uce``: Universal Cell Embeddings (Rosen et al. 2023, bioRxiv 2023.11.28.568918).

A compact re-implementation of what produces the official cell embedding, written from the
official code (github.com/snap-stanford/UCE: ``eval_single_anndata.py``, ``evaluate.py``,
``eval_data.py``, ``model.py``, ``data_proc/data_utils.py``, ``data_proc/gene_embeddings.py``).
The released files load unchanged, with their key names. Each choice and its official source:

* **files** (``evaluate.AnndataProcessor.check_paths``): ``--model-dir`` is the official
  ``model_files/`` folder: the state dict (``4layer_model.torch`` or ``33l_8ep_1024t_1280.torch``;
  ``--option checkpoint=NAME`` when several ``*.torch`` are there), ``species_chrom.csv``,
  ``species_offsets.pkl`` and ``protein_embeddings/<Species>.<assembly>.gene_symbol_to_embedding_ESM2.pt``
  (or that file directly in ``--model-dir``). Only the file of ``--option species`` (``human`` by
  default) is read; the official ``get_species_to_pe`` loads all 8 training species' files and
  fails without them. ``all_tokens.torch`` is optional (next point).
* **token table** (``evaluate.run_eval``, ``get_ESM2_embeddings``): the official code builds the
  model with a zero ``pe_embedding`` of 145,469 x 5,120, loads the checkpoint strictly (so the
  checkpoint carries its own table), then replaces the table by ``all_tokens.torch`` only when
  that file, after appending 1,895 chromosome rows when it has 143,574, does not have 145,469
  rows. With the released ``all_tokens.torch`` (143,574 rows) the checkpoint's table is used and
  the file has no effect, so it may be absent here; when present its row count decides as
  above (recorded as ``token_table``). Both tables are several GB: they are memory-mapped
  (``torch.load(mmap=True, weights_only=True)``; a file in torch's legacy format is read whole)
  and only the rows a dataset needs are read
  (pad 0, chromosome-close 2, CLS 3, the chromosome tokens ``143,574 + code`` and the dataset's
  genes). Those rows are L2-normalised and passed through the per-token ``encoder`` once, in
  fp32, into a small table of ``d_model`` columns (the official model does the same per token in
  every batch).
* **weights** (``model.py::TransformerModel``, ``nn.TransformerEncoderLayer`` defaults): strict:
  every key of the official model with its shape, nothing else. Sizes come from the shapes
  (``token_dim``, ``d_model``, ``d_hid``, ``output_dim``; the number of layers from the
  ``transformer_encoder.layers.{i}`` keys, or ``--option nlayers``, which must agree); 20 heads and
  the decoder/binary-decoder widths (1,024; 2,048, 512, 128) are hard-coded there and here, and
  so is the binary decoder's input width, output_dim + 1,280 (a literal 1,280 in ``model.py``,
  not d_model: a checkpoint of the official class at another width has it too).
  ``binary_decoder.*`` and ``gene_embedding_layer.*`` (gene-expression prediction heads) are
  checked by name and shape, never allocated.
* **genes** (``gene_embeddings.load_gene_embeddings_adata``, ``data_utils.adata_path_to_prot_chrom_starts``):
  symbols upper-cased; a gene is used when it is a key of the species' protein-embedding dict
  (keys upper-cased, the first position of a key kept, as the official dict comprehension does)
  and has a row for that species in ``species_chrom.csv``. Its token is ``offset[species] + its
  position in the dict``; its chromosome code is its index among the sorted
  ``"<species>_<chromosome>"`` categories of the whole CSV (``pd.Categorical``), its start the
  CSV's ``start``. Repeated source symbols all stay, as there. **Difference:** a gene with an
  embedding but no CSV row makes the official code fail (KeyError); here it is dropped and
  counted (``genes_without_position``). Fewer than 5% of the dataset's genes usable is refused.
* **filter** (``data_utils.process_raw_anndata``, ``--filter`` true by default): genes detected
  in fewer than 10 cells of the dataset are dropped (``sc.pp.filter_genes(min_cells=10)``, before
  the gene subset, as there; ``--option min_cells=0`` turns it off). This makes one extra pass
  over the dataset. **Difference:** the official ``filter_cells(min_genes=25)`` drops cells; the
  store needs every cell, so none is dropped here.
* **sentence** (``eval_data.sample_cell_sentences``): raw counts (truncated to integers, as the
  official int64 memmap), weights ``log1p(count)`` normalised to sum 1; 1,024 genes drawn with
  replacement (``RandomState.choice``), sorted by chromosome; the chromosomes in a random order
  (``RandomState.shuffle`` after the draw); ``[CLS=3]``, then per chromosome ``143,574 + code``,
  its genes by genomic start, the close token 2; padding 0. Length ``1 + 1024 + 2 x chromosomes``.
  Ties between *different* genes with the same start are broken by source gene order (the
  official ``np.argsort`` leaves them to numpy's unstable quicksort). Weights are float64 (official
  float32; ``choice`` renormalises its cumulative sum either way). A cell without a usable
  expressed gene (the official code fails on it) is ``[CLS]`` alone.
* **randomness**: official runs never seed numpy, so their embeddings change from run to run
  (UCE issue #45). Here every cell draws from its own ``np.random.RandomState`` seeded from
  (``--option seed``, the dataset name, the cell's used genes and counts), with the official
  sequence of calls (``choice`` then ``shuffle``): a cell's sentence does not depend on its batch,
  chunk, a resumed run or the rank that embeds it. (The engine hands the tokenizer a block of
  rows without its offset, so the cell's content, not its row number, identifies it; identical
  cells get identical sentences.)
* **forward** (``evaluate.run_eval``, ``TransformerModel.forward``): token rows L2-normalised,
  ``encoder`` (Linear, GELU, LayerNorm) x sqrt(d_model), + the checkpoint's ``pos_encoder.pe``
  buffer; post-norm ReLU layers (eps 1e-5) with PyTorch SDPA attention; ``decoder`` (3 x
  [Linear, LayerNorm, GELU], Linear); embedding = the CLS position of the decoder output,
  L2-normalised (``output_dim``, 1,280). After the packed q/k/v projection (one call for every
  position: keys and values need them all), the last layer and the decoder are run for the CLS
  position only (the others do not reach the embedding). The projections are ``nn.Linear``
  modules stored under the official names, so LoRA can wrap them (``scdrugmap finetune``).
* **padding** (``--option padding_mask``): the official code passes a *float* key-padding mask
  ``1 - mask``, which PyTorch adds to the attention logits: padded keys get +1.0 instead of being
  masked out, and the official collator pads each batch to its longest cell, so an official
  embedding depends on the other cells of its batch. ``proper`` (default) masks padded keys
  out: the embedding is what the official code gives a cell alone in its batch (or the longest
  of its batch) and does not depend on batching. ``official`` keeps the additive +1.0 and pads
  every cell to the full 1,536 positions (the ``pos_encoder.pe`` length), so it too is
  batch-invariant: the official quirk at a fixed padding.
* **precision**: the engine's ``--option precision`` (bf16 autocast on CUDA; the official code
  runs fp32); the token table is built in fp32.

torch is imported inside functions: the registry must load on the core install.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, Ragged, TorchBackbone, key_mismatches, official_in_proj_names, sha256_files
from ..registry import Option, register

# eval_single_anndata.py argparse defaults and evaluate.py constants
PAD_IDX, CHROM_CLOSE_IDX, CLS_IDX = 0, 2, 3      # chrom_token_left_idx (1) is not used at evaluation
CHROM_TOKEN_OFFSET = 143574                       # rows of all_tokens.torch; chromosome tokens follow
TABLE_ROWS = 145469                               # the checkpoint's pe_embedding rows (143,574 + 1,895)
SAMPLE_SIZE = 1024
N_HEADS = 20                                      # hard-coded in run_eval
DECODER_HIDDEN = 1024                             # model.py: full_block(d_model, 1024)
BINARY_HIDDEN = (2048, 512, 128)                  # model.py: binary_decoder
BINARY_EXTRA = 1280     # model.py: full_block(output_dim + 1280, 2048): a literal, not d_model, so the
                        # binary decoder takes output_dim + 1280 inputs whatever d_model is
MIN_MATCHED = 0.05                                # refuse a dataset with fewer usable genes than this share
TOKEN_FILE = "all_tokens.torch"
CHROM_CSV = "species_chrom.csv"
OFFSETS_PKL = "species_offsets.pkl"
PE_DIR = "protein_embeddings"
SPECIES_FILES = {     # data_proc/data_utils.py::get_species_to_pe
    "human": "Homo_sapiens.GRCh38",
    "mouse": "Mus_musculus.GRCm39",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1",
    "zebrafish": "Danio_rerio.GRCz11",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0",
    "pig": "Sus_scrofa.Sscrofa11.1",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10",
}
PE_SUFFIX = ".gene_symbol_to_embedding_ESM2.pt"
FIGSHARE = {          # evaluate.py::AnndataProcessor.check_paths
    CHROM_CSV: "https://figshare.com/ndownloader/files/42706558",
    OFFSETS_PKL: "https://figshare.com/ndownloader/files/42706555",
    PE_DIR: "https://figshare.com/ndownloader/files/42715213",
    TOKEN_FILE: "https://figshare.com/ndownloader/files/42706585",
    "4layer_model.torch": "https://figshare.com/ndownloader/files/42706576",
    "33l_8ep_1024t_1280.torch": "https://figshare.com/ndownloader/files/43423236",
}
PADDING = {"proper": "padded keys masked out (batch-invariant)",
           "official": "official additive +1.0 on padded keys, every cell padded to the full length"}


# ---- files ------------------------------------------------------------------------------------
def load_tensors(path: Path, what: str):
    """``torch.load`` memory-mapped and tensor-only: a table of several GB costs only the pages read.
    A file in torch's legacy (non-zip) format cannot be memory-mapped and is read whole."""
    import torch

    hint = "UCE's released files hold tensors only; a file that needs pickled code is refused"
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise UserError(f"cannot read {path} ({what}): RuntimeError: {str(e).splitlines()[0][:160]}") from None
    except Exception as e:
        raise UserError(f"cannot read {path} ({what}) as a tensor-only torch file ({type(e).__name__}): "
                        f"{hint}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({what}) as a tensor-only torch file ({type(e).__name__}): "
                        f"{hint}") from None


def find_checkpoint(folder: Path, name: str) -> Path:
    if name:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder} has no {name}: check --option checkpoint={name}")
        return path
    found = sorted(p for p in folder.glob("*.torch") if p.name != TOKEN_FILE)
    if len(found) > 1:
        raise UserError(f"{folder} holds several UCE checkpoints ({', '.join(p.name for p in found)}): "
                        "choose one with --option checkpoint=NAME")
    if not found:
        raise UserError(f"{folder} has no UCE checkpoint (*.torch): download 4layer_model.torch "
                        f"({FIGSHARE['4layer_model.torch']}) or 33l_8ep_1024t_1280.torch into it")
    return found[0]


def find_protein_embeddings(folder: Path, species: str) -> Path:
    name = SPECIES_FILES[species] + PE_SUFFIX
    for path in (folder / PE_DIR / name, folder / name):
        if path.is_file():
            return path
    raise UserError(f"{folder} has no {PE_DIR}/{name}: download protein_embeddings.tar.gz ({FIGSHARE[PE_DIR]}) "
                    f"and extract it into {folder.name}")


def required_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder} has no {name}: download {FIGSHARE[name]} into it (UCE's model_files layout)")
    return path


# ---- the checkpoint: official names and shapes ---------------------------------------------------
@dataclass(frozen=True)
class Dims:
    token_dim: int
    d_model: int
    d_hid: int
    output_dim: int
    layers: int
    positions: int


def read_dims(state: dict, path: Path) -> Dims:
    need = ("encoder.0.weight", "transformer_encoder.layers.0.linear1.weight", "decoder.3.weight",
            "pos_encoder.pe")
    missing = [k for k in need if k not in state]
    if missing:
        raise UserError(f"{path.name} is not a UCE state dict: it lacks {', '.join(missing[:3])}: use "
                        "4layer_model.torch or 33l_8ep_1024t_1280.torch")
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer_encoder.layers.")
              and k.split(".")[2].isdigit()}
    return Dims(token_dim=int(state["encoder.0.weight"].shape[1]), d_model=int(state["encoder.0.weight"].shape[0]),
                d_hid=int(state["transformer_encoder.layers.0.linear1.weight"].shape[0]),
                output_dim=int(state["decoder.3.weight"].shape[0]), layers=max(layers) + 1,
                positions=int(state["pos_encoder.pe"].shape[0]))


def official_keys(dims: Dims) -> dict:
    """Every key of the official ``TransformerModel`` state dict (with ``pe_embedding``) -> shape."""
    d, t, h, o = dims.d_model, dims.token_dim, dims.d_hid, dims.output_dim

    def linear(name, n_in, n_out):
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    def norm(name, n):
        return {f"{name}.weight": (n,), f"{name}.bias": (n,)}

    def full_block(name, n_in, n_out):         # Linear, LayerNorm, GELU, Dropout
        return {**linear(f"{name}.0", n_in, n_out), **norm(f"{name}.1", n_out)}

    keys = {"pos_encoder.pe": (dims.positions, 1, d), **linear("encoder.0", t, d), **norm("encoder.2", d)}
    for i in range(dims.layers):
        p = f"transformer_encoder.layers.{i}"
        keys.update({f"{p}.self_attn.in_proj_weight": (3 * d, d), f"{p}.self_attn.in_proj_bias": (3 * d,),
                     **linear(f"{p}.self_attn.out_proj", d, d), **linear(f"{p}.linear1", d, h),
                     **linear(f"{p}.linear2", h, d), **norm(f"{p}.norm1", d), **norm(f"{p}.norm2", d)})
    keys.update({**full_block("decoder.0", d, DECODER_HIDDEN), **full_block("decoder.1", DECODER_HIDDEN, o),
                 **full_block("decoder.2", o, o), **linear("decoder.3", o, o)})
    b1, b2, b3 = BINARY_HIDDEN
    keys.update({**full_block("binary_decoder.0", o + BINARY_EXTRA, b1), **full_block("binary_decoder.1", b1, b2),
                 **full_block("binary_decoder.2", b2, b3), **linear("binary_decoder.3", b3, 1)})
    keys.update({**linear("gene_embedding_layer.0", t, d), **norm("gene_embedding_layer.2", d)})
    keys["pe_embedding.weight"] = (TABLE_ROWS, t)
    return keys


def check_state(state: dict, dims: Dims, path: Path) -> None:
    """Refuse (one line) a state dict with a missing, unexpected or mis-sized key."""
    problems = key_mismatches(state, official_keys(dims))
    if problems:
        raise UserError(f"{path.name} does not match the official UCE model (strict loading): {problems}: "
                        "use a released UCE checkpoint")


def build_model(dims: Dims):
    """The official module tree, the parts the embedding runs only, on the meta device (weights
    are assigned from the checkpoint). Dropouts are left out (inference)."""
    import torch
    from torch import nn

    def module(**children):
        m = nn.Module()
        for name, child in children.items():
            setattr(m, name, child)
        return m

    def full_block(n_in, n_out):
        return nn.Sequential(nn.Linear(n_in, n_out), nn.LayerNorm(n_out), nn.GELU())

    d = dims.d_model
    with torch.device("meta"):
        pos = nn.Module()
        pos.register_buffer("pe", torch.empty(dims.positions, 1, d))
        layers = []
        for _ in range(dims.layers):
            # the packed q/k/v projection as a module (LoRA can wrap it), under the official names
            attn = module(in_proj=nn.Linear(d, 3 * d), out_proj=nn.Linear(d, d))
            official_in_proj_names(attn)
            layers.append(module(self_attn=attn, linear1=nn.Linear(d, dims.d_hid), linear2=nn.Linear(dims.d_hid, d),
                                 norm1=nn.LayerNorm(d), norm2=nn.LayerNorm(d)))
        return module(
            pos_encoder=pos,
            encoder=nn.Sequential(nn.Linear(dims.token_dim, d), nn.GELU(), nn.LayerNorm(d)),
            transformer_encoder=module(layers=nn.ModuleList(layers)),
            decoder=nn.Sequential(full_block(d, DECODER_HIDDEN), full_block(DECODER_HIDDEN, dims.output_dim),
                                  full_block(dims.output_dim, dims.output_dim),
                                  nn.Linear(dims.output_dim, dims.output_dim)),
        )


def encode_tokens(model, rows):
    """Token rows (n, token_dim) -> ``encoder(normalize(rows)) * sqrt(d_model)`` (n, d_model), fp32."""
    import torch.nn.functional as F

    d = model.encoder[0].weight.shape[0]
    return model.encoder(F.normalize(rows.float(), dim=-1)) * math.sqrt(d)


def encoder_layer(layer, x, bias, heads: int, cls_only: bool = False):
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU) with SDPA; ``bias`` is a bool keep-mask or an
    additive float mask over the keys, (batch, 1, 1, keys). ``cls_only``: the output at position 0 only."""
    import torch.nn.functional as F

    a = layer.self_attn
    b, n, d = x.shape
    resid = x[:, :1] if cls_only else x
    qkv = a.in_proj(x)                     # called as a module: LoRA adapters on it are used
    q = qkv[:, :1, :d] if cls_only else qkv[..., :d]
    k, v = qkv[..., d:].chunk(2, dim=-1)

    def heads_first(t):
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    mask = bias if not bias.is_floating_point() else bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = a.out_proj(out.transpose(1, 2).reshape(b, resid.shape[1], d))
    h = layer.norm1(resid + out)
    return layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))


def cell_embeddings(model, tokens, attention_mask, additive: bool, heads: int = N_HEADS):
    """Encoded tokens (batch, length, d_model) -> L2-normalised CLS embeddings (batch, output_dim)."""
    import torch.nn.functional as F

    n = tokens.shape[1]
    x = tokens + model.pos_encoder.pe[:n, 0]
    if additive:          # official: src_key_padding_mask = 1 - mask, a float mask, added to the logits
        bias = (1 - attention_mask).float()[:, None, None, :]
    else:
        bias = attention_mask.bool()[:, None, None, :]
    layers = model.transformer_encoder.layers
    for i, layer in enumerate(layers):
        x = encoder_layer(layer, x, bias, heads, cls_only=i == len(layers) - 1)
    return F.normalize(model.decoder(x[:, 0]).float(), dim=-1)


# ---- genes ---------------------------------------------------------------------------------------
@dataclass
class SpeciesGenes:
    """The species' genes: token row, chromosome code and start, by upper-case symbol."""

    rows: dict           # symbol -> token row (offset + position in the protein-embedding dict)
    chrom: dict          # symbol -> (chromosome code, start), species rows of species_chrom.csv
    n_categories: int
    offset: int
    n_embedded: int


def read_species_genes(csv_path: Path, offsets_path: Path, pe_path: Path, species: str) -> SpeciesGenes:
    import pandas as pd

    try:
        with open(offsets_path, "rb") as f:
            offsets = pickle.load(f)
    except Exception as e:
        raise UserError(f"cannot read {offsets_path}: {type(e).__name__}") from None
    if not isinstance(offsets, dict):
        raise UserError(f"{offsets_path} is not a dictionary of species -> offset: is it species_offsets.pkl?")
    if species not in offsets:
        raise UserError(f"{offsets_path.name} has no offset for species {species!r} (it has "
                        f"{', '.join(sorted(map(str, offsets)))})")
    offset = int(offsets[species])
    embeddings = load_tensors(pe_path, "protein embeddings")
    if not isinstance(embeddings, dict) or not embeddings:
        raise UserError(f"{pe_path.name} is not a dictionary of gene symbol -> protein embedding")
    symbols = list(dict.fromkeys(str(k).upper() for k in embeddings))   # {k.upper(): v}: first position kept
    rows = {s: offset + i for i, s in enumerate(symbols)}
    del embeddings
    try:
        table = pd.read_csv(csv_path, dtype={"gene_symbol": str, "chromosome": str, "species": str})
    except Exception as e:
        raise UserError(f"cannot read {csv_path}: {type(e).__name__}") from None
    absent = [c for c in ("gene_symbol", "chromosome", "start", "species") if c not in table.columns]
    if absent:
        raise UserError(f"{csv_path.name} lacks column(s) {', '.join(absent)}: is it UCE's species_chrom.csv?")
    codes = pd.Categorical(table["species"] + "_" + table["chromosome"])    # get_spec_chrom_csv
    starts = pd.to_numeric(table["start"], errors="coerce").to_numpy(dtype=np.float64)
    chrom = {}
    keep = (table["species"] == species).to_numpy() & (codes.codes >= 0) & np.isfinite(starts)
    for symbol, code, start in zip(table["gene_symbol"].to_numpy()[keep], codes.codes[keep], starts[keep]):
        chrom.setdefault(symbol, (int(code), float(start)))
    if not chrom:
        raise UserError(f"{csv_path.name} has no gene of species {species!r}: check --option species")
    return SpeciesGenes(rows, chrom, len(codes.categories), offset, len(symbols))


@dataclass
class GeneMatch:
    """One dataset's usable source columns and their token rows, chromosome codes and starts."""

    cols: np.ndarray
    rows: np.ndarray
    codes: np.ndarray
    starts: np.ndarray
    facts: dict


def count_cells(source, n_genes: int, step: int = 4096) -> np.ndarray:
    """Per source gene, the number of cells with a count above 0 (scanpy's filter_genes)."""
    detected = np.zeros(n_genes, dtype=np.int64)
    for lo in range(0, source.n_cells, step):
        block = sp.csr_matrix(source.rows(lo, min(lo + step, source.n_cells)))
        detected += np.bincount(block.indices[block.data > 0], minlength=n_genes)
    return detected


# ---- sentences -----------------------------------------------------------------------------------
class SentenceTokenizer(CellTokenizer):
    """UCE's cell sentence (see the module docstring): official token ids, unpadded."""

    def __init__(self, rows: np.ndarray, codes: np.ndarray, starts: np.ndarray, cols: np.ndarray, seed: int,
                 dataset: str, max_length: int, sample_size: int = SAMPLE_SIZE):
        self.rows, self.codes, self.starts, self.cols = rows, codes, starts, cols
        self.seed, self.dataset = int(seed), str(dataset)
        self.max_length, self.sample_size = max_length, sample_size
        self.chrom_local = np.unique(codes, return_inverse=True)[1].astype(np.int64) if len(codes) else codes

    def prepare(self, block):
        x = sp.csr_matrix(sp.csr_matrix(block)[:, self.cols], dtype=np.float64)
        x.data = np.trunc(x.data)          # the official int64 memmap truncates
        x.data[x.data < 0] = 0
        x.eliminate_zeros()
        x.sort_indices()
        return x

    def rng(self, genes: np.ndarray, counts: np.ndarray) -> np.random.RandomState:
        """The cell's own generator, from the seed, the dataset and the cell's used genes and counts."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.int64(self.seed).tobytes())
        h.update(self.dataset.encode())
        h.update(b"\0")
        h.update(np.ascontiguousarray(genes, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(counts, dtype=np.float64).tobytes())
        return np.random.RandomState(np.frombuffer(h.digest(), dtype=np.uint32))

    def tokens(self, x, i: int) -> np.ndarray:
        lo, hi = x.indptr[i], x.indptr[i + 1]
        genes, counts = x.indices[lo:hi], x.data[lo:hi]
        if len(genes) == 0:
            return np.array([CLS_IDX], dtype=np.int64)
        rng = self.rng(genes, counts)
        weights = np.log1p(counts)
        picked = genes[rng.choice(len(genes), size=self.sample_size, replace=True, p=weights / weights.sum())]
        codes, starts = self.codes[picked], self.starts[picked]
        order = np.lexsort((picked, starts, codes))          # chromosome, then start, then gene order
        picked, codes = picked[order], codes[order]
        chromosomes, first = np.unique(codes, return_index=True)
        bounds = dict(zip(chromosomes.tolist(), zip(first, np.r_[first[1:], len(codes)])))
        rng.shuffle(chromosomes)                             # chromosome order: random, after the draw
        parts = [[CLS_IDX]]
        for c in chromosomes:
            a, b = bounds[c]
            parts += [[CHROM_TOKEN_OFFSET + int(c)], self.rows[picked[a:b]], [CHROM_CLOSE_IDX]]
        ids = np.concatenate(parts).astype(np.int64)
        if len(ids) > self.max_length:
            raise UserError(f"dataset {self.dataset!r}: a cell's sentence spans {len(chromosomes)} chromosomes, "
                            f"{len(ids)} tokens, more than the model's {self.max_length} positions")
        return ids

    def tokens_many(self, x, rows) -> Ragged:
        """:meth:`tokens` of each cell of ``rows``, the same draws with less per-cell Python: one
        reseeded generator (``RandomState.seed``, not a new one per cell), the weighted draw as
        ``RandomState.choice`` makes it (cumulative sum, ``random_sample``, ``searchsorted``), the
        sort by (chromosome, start, gene) as one sort of precomputed ranks, the chromosome order
        as the shuffle of ``arange`` (a shuffle's swaps depend on the length only), and the
        sentences laid out for the whole batch at once."""
        if not hasattr(self, "_rank"):
            order = np.lexsort((np.arange(len(self.codes)), self.starts, self.codes))
            self._by_rank = order                                    # rank -> gene
            self._rank = np.empty(len(order), dtype=np.int64)
            self._rank[order] = np.arange(len(order))                # gene -> rank
            self._state = np.random.RandomState(0)
            base = hashlib.blake2b(digest_size=16)
            base.update(np.int64(self.seed).tobytes())
            base.update(self.dataset.encode())
            base.update(b"\0")
            self._base = base
        rows = np.asarray(rows, dtype=np.int64)
        rs, base = self._state, self._base
        picked_parts, cells = [], []          # per cell: sorted picked genes; (n_chrom, chromosome codes, perm)
        for i in rows:
            lo, hi = x.indptr[i], x.indptr[i + 1]
            if hi == lo:
                cells.append(None)
                continue
            genes = x.indices[lo:hi].astype(np.int64)
            counts = x.data[lo:hi]
            h = base.copy()
            h.update(genes.tobytes())
            h.update(np.ascontiguousarray(counts, dtype=np.float64).tobytes())
            rs.seed(np.frombuffer(h.digest(), dtype=np.uint32))
            weights = np.log1p(counts)
            cdf = (weights / weights.sum()).cumsum()
            cdf /= cdf[-1]
            picked = genes[cdf.searchsorted(rs.random_sample(self.sample_size), side="right")]
            picked = self._by_rank[np.sort(self._rank[picked])]
            codes = self.codes[picked]
            change = np.empty(len(codes), dtype=bool)
            change[0] = True
            np.not_equal(codes[1:], codes[:-1], out=change[1:])
            first = np.flatnonzero(change)
            perm = np.arange(len(first))
            rs.shuffle(perm)
            picked_parts.append(picked)
            cells.append((first, codes[first], perm))
        # layout: CLS, then per chromosome in shuffled order: its token, its genes' rows, the close token
        lengths = np.array([1 if c is None else 1 + self.sample_size + 2 * len(c[0]) for c in cells], dtype=np.int64)
        too_long = np.flatnonzero(lengths > self.max_length)
        if len(too_long):
            k = int(too_long[0])
            raise UserError(f"dataset {self.dataset!r}: a cell's sentence spans {len(cells[k][0])} chromosomes, "
                            f"{lengths[k]} tokens, more than the model's {self.max_length} positions")
        out = np.empty(int(lengths.sum()), dtype=np.int64)
        starts = Ragged.offsets(lengths)[:-1]
        out[starts] = CLS_IDX
        gene_pos, chrom_pos, chrom_ids, close_pos = [], [], [], []
        k = 0
        for start, c in zip(starts, cells):
            if c is None:
                continue
            first, chroms, perm = c
            n = self.sample_size
            seg = np.empty(len(first), dtype=np.int64)              # genes per chromosome, sorted order
            seg[:-1] = first[1:] - first[:-1]
            seg[-1] = n - first[-1]
            step = seg[perm] + 2
            seg_out = np.empty(len(perm), dtype=np.int64)            # where each segment starts in the output
            seg_out[perm] = start + 1 + np.cumsum(step) - step
            chrom_pos.append(seg_out)
            chrom_ids.append(chroms)
            close_pos.append(seg_out + seg + 1)
            gene_pos.append(np.repeat(seg_out + 1 - first, seg) + np.arange(n))
            k += 1
        if picked_parts:
            out[np.concatenate(gene_pos)] = self.rows[np.concatenate(picked_parts)]
            out[np.concatenate(chrom_pos)] = CHROM_TOKEN_OFFSET + np.concatenate(chrom_ids)
            out[np.concatenate(close_pos)] = CHROM_CLOSE_IDX
        return Ragged(lengths, {"input_ids": out})

    def lengths(self, x) -> np.ndarray:
        """An upper bound (1 + sample size + 2 x the cell's expressed chromosomes): for batching only."""
        n_chrom = int(self.chrom_local.max()) + 1 if len(self.chrom_local) else 1
        row = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        present = np.zeros(x.shape[0] * n_chrom, dtype=bool)       # cell x chromosome: any gene expressed
        present[row * n_chrom + self.chrom_local[x.indices]] = True
        k = np.minimum(present.reshape(x.shape[0], n_chrom).sum(axis=1), self.sample_size)
        return np.where(np.diff(x.indptr) > 0, 1 + self.sample_size + 2 * k, 1)


def official_padding(ids, mask, length: int):
    """Right-pad a batch to ``length`` positions with the pad token (mask 0)."""
    import torch.nn.functional as F

    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return F.pad(ids, (0, extra), value=PAD_IDX), F.pad(mask, (0, extra), value=0)


# ---- the backbone -------------------------------------------------------------------------------
@register
class UCE(TorchBackbone):
    name = "uce"
    summary = "Universal Cell Embeddings (ESM2 gene tokens in chromosome order); L2-normalised CLS"
    default_dim = 1280
    default_batch_size = 25          # eval_single_anndata.py --batch_size
    requires = ("torch",)
    pad_id = PAD_IDX
    options = {
        **TorchBackbone.options,
        "checkpoint": Option("", "state dict file in --model-dir (default: the only *.torch besides all_tokens.torch)"),
        "species": Option("human", f"species of the datasets ({', '.join(SPECIES_FILES)})"),
        "nlayers": Option(0, "transformer layers (0: from the checkpoint's keys; must agree with them)", int, min=0),
        "seed": Option(0, "seeds each cell's gene sampling, with the dataset name and the cell's counts", int, min=0),
        "padding_mask": Option("proper", "proper (padded keys masked out) or official (additive +1.0 on padded "
                                         "keys, every cell padded to 1,536)"),
        "min_cells": Option(10, "drop genes detected in fewer cells of the dataset (official filter; 0: off)", int, min=0),
    }

    # LoRA targets (``scdrugmap finetune``): the layers' attention and feed-forward projections. The
    # token ``encoder`` is left out: its output is computed once per token row, without gradients.
    lora_attention = (r"self_attn\.(in_proj|out_proj)",)
    lora_mlp = (r"layers\.\d+\.linear[12]",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import torch

        c = self.config
        if c["species"] not in SPECIES_FILES:
            raise UserError(f"--option species={c['species']}: UCE knows {', '.join(SPECIES_FILES)}")
        if c["padding_mask"] not in PADDING:
            raise UserError(f"--option padding_mask={c['padding_mask']}: use proper or official")
        if c["min_cells"] < 0 or c["nlayers"] < 0:
            raise UserError("--option min_cells and nlayers must not be negative")
        self.model_dir = Path(self.model_dir)
        if not self.model_dir.is_dir():
            raise UserError(f"--model-dir {self.model_dir} is not a directory: point it at UCE's model_files folder")
        self.ckpt_path = find_checkpoint(self.model_dir, c["checkpoint"])
        self.csv_path = required_file(self.model_dir, CHROM_CSV)
        self.offsets_path = required_file(self.model_dir, OFFSETS_PKL)
        self.pe_path = find_protein_embeddings(self.model_dir, c["species"])
        state = load_tensors(self.ckpt_path, "UCE checkpoint")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f"{self.ckpt_path.name} is not a state dict of tensors: is it a UCE checkpoint?")
        self.dims = read_dims(state, self.ckpt_path)
        if c["nlayers"] and c["nlayers"] != self.dims.layers:
            raise UserError(f"--option nlayers={c['nlayers']}, but {self.ckpt_path.name} holds {self.dims.layers} "
                            "layers: drop the option or choose the matching checkpoint")
        check_state(state, self.dims, self.ckpt_path)
        if self.dims.d_model % N_HEADS:
            raise UserError(f"{self.ckpt_path.name}: d_model {self.dims.d_model} is not divisible into {N_HEADS} heads")
        model = build_model(self.dims)
        used = model.state_dict()
        model.load_state_dict({k: state[k].float() for k in used}, strict=True, assign=True)
        self.model = model.to(self.device).eval()
        self.token_table_name, self.all_tokens_rows, table = self._token_source(state)
        self._table_source = table                        # memory-mapped: rows are read on demand
        del state
        self.genes = read_species_genes(self.csv_path, self.offsets_path, self.pe_path, c["species"])
        self.local = torch.full((table.shape[0],), -1, dtype=torch.long, device=self.device)
        self.table = torch.empty((0, self.dims.d_model), dtype=torch.float32, device=self.device)
        self._add_rows(np.array([PAD_IDX, CHROM_CLOSE_IDX, CLS_IDX]))
        self._matched: dict = {}
        self._sha256 = None

    def _token_source(self, state):
        """The official choice of token table (evaluate.run_eval): the checkpoint's, unless
        all_tokens.torch (+ 1,895 chromosome rows when it has 143,574) has another row count."""
        path = self.model_dir / TOKEN_FILE
        if not path.is_file():
            return "checkpoint pe_embedding.weight (all_tokens.torch absent)", None, state["pe_embedding.weight"]
        tokens = load_tensors(path, "token table")
        if not hasattr(tokens, "dim") or tokens.dim() != 2 or tokens.shape[1] != self.dims.token_dim:
            shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
            raise UserError(f"{TOKEN_FILE} is not a (tokens x {self.dims.token_dim}) tensor ({shape}): is it the "
                            "token table released with this checkpoint?")
        rows = int(tokens.shape[0])
        if rows in (CHROM_TOKEN_OFFSET, TABLE_ROWS):
            return "checkpoint pe_embedding.weight", rows, state["pe_embedding.weight"]
        return TOKEN_FILE, rows, tokens

    def _add_rows(self, rows: np.ndarray, step: int = 1024) -> None:
        """Gather token rows not yet in the table, encode them once (fp32) and append them."""
        import torch

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        n = self._table_source.shape[0]
        if len(rows) and rows.max() >= n:
            raise UserError(f"token row {int(rows.max())} is beyond the {self.token_table_name.split()[0]} table's "
                            f"{n} rows: species_offsets.pkl, species_chrom.csv and the token table do not belong "
                            "together")
        known = self.local[torch.from_numpy(rows).to(self.device)].cpu().numpy() >= 0
        rows = rows[~known]
        if not len(rows):
            return
        parts = []
        with torch.no_grad():
            for i in range(0, len(rows), step):
                idx = torch.from_numpy(rows[i:i + step])
                chunk = self._table_source.index_select(0, idx).to(self.device)
                parts.append(encode_tokens(self.model, chunk).float())
        first = self.table.shape[0]
        self.table = torch.cat([self.table, *parts])
        self.local[torch.from_numpy(rows).to(self.device)] = torch.arange(first, first + len(rows), device=self.device)

    @property
    def dim(self) -> int:
        return self.dims.output_dim

    @property
    def files(self) -> list[Path]:
        extra = [self.model_dir / TOKEN_FILE] if self.token_table_name == TOKEN_FILE else []
        return [self.ckpt_path, self.csv_path, self.offsets_path, self.pe_path, *extra]

    def checkpoint_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_files(self.files)
        return self._sha256

    # -- genes ----------------------------------------------------------------------------------
    def matching(self, source) -> GeneMatch:
        if source.name in self._matched:
            return self._matched[source.name]
        symbols = np.asarray(source.symbols(), dtype=str)
        g = self.genes
        embedded = np.array([s in g.rows for s in symbols])
        placed = np.array([e and s in g.chrom for s, e in zip(symbols, embedded)], dtype=bool)
        usable = placed.copy()
        facts = {"genes_in_dataset": int(len(symbols)), "genes_with_embedding": int(embedded.sum()),
                 "genes_without_position": int(embedded.sum() - placed.sum())}
        if self.config["min_cells"] and usable.any():
            detected = count_cells(source, len(symbols))
            usable &= detected >= self.config["min_cells"]
            facts["genes_below_min_cells"] = int(placed.sum() - usable.sum())
        if usable.sum() < max(1, MIN_MATCHED * len(symbols)):
            raise UserError(f"dataset {source.name!r}: only {int(usable.sum())} of {len(symbols)} genes have a UCE "
                            f"protein embedding and chromosome position for {self.config['species']} (and pass "
                            "min_cells): check that var holds gene symbols of that species")
        cols = np.flatnonzero(usable)
        rows = np.array([g.rows[symbols[c]] for c in cols], dtype=np.int64)
        codes = np.array([g.chrom[symbols[c]][0] for c in cols], dtype=np.int64)
        starts = np.array([g.chrom[symbols[c]][1] for c in cols], dtype=np.float64)
        facts.update({"genes_matched": int(len(cols)), "chromosomes": int(len(np.unique(codes)))})
        self._add_rows(np.concatenate([rows, CHROM_TOKEN_OFFSET + np.unique(codes)]))
        self._matched[source.name] = GeneMatch(cols, rows, codes, starts, facts)
        return self._matched[source.name]

    def cell_tokenizer(self, source) -> SentenceTokenizer:
        m = self.matching(source)
        return SentenceTokenizer(m.rows, m.codes, m.starts, m.cols, self.config["seed"], source.name,
                                 self.dims.positions)

    def pool(self, input_ids, attention_mask):
        additive = self.config["padding_mask"] == "official"
        if additive:
            input_ids, attention_mask = official_padding(input_ids, attention_mask, self.dims.positions)
        tokens = self.table[self.local[input_ids]]
        return cell_embeddings(self.model, tokens, attention_mask, additive)

    def dataset_params(self, source) -> dict:
        return dict(self.matching(source).facts)

    def params(self) -> dict:
        d = self.dims
        mode = self.config["padding_mask"]
        return {**super().params(), "checkpoint": self.ckpt_path.name,
                "batching": ("length-sorted within each store chunk, right padding, padded keys masked out"
                             if mode == "proper" else f"every cell padded to {d.positions} positions"),
                "padding": PADDING[mode], "layers": d.layers, "heads": N_HEADS, "d_model": d.d_model,
                "token_dim": d.token_dim, "d_hid": d.d_hid, "output_dim": d.output_dim, "positions": d.positions,
                "sample_size": SAMPLE_SIZE, "token_table": self.token_table_name,
                "all_tokens_rows": self.all_tokens_rows, "chrom_token_offset": CHROM_TOKEN_OFFSET,
                "chromosome_categories": self.genes.n_categories, "species_offset": self.genes.offset,
                "protein_embeddings": self.pe_path.name, "protein_embedding_genes": self.genes.n_embedded,
                "sampling": "per cell: numpy RandomState seeded from (seed, dataset, the cell's used counts); "
                            "log1p(count) weights, 1,024 draws with replacement, then a chromosome shuffle",
                "embedding": "CLS position of the decoder output, L2-normalised"}
