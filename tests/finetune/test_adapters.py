"""LoRA targets and the gradient check: every registered backbone with weights fine-tunes with its
default targets (random weights in the official layouts), and the check catches adapters that
would never train (nn.MultiheadAttention's out_proj, layers after the pooled one)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extract"))

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import checkpoints as ck  # noqa: E402
from scdrugmap.errors import UserError  # noqa: E402
from scdrugmap.extract import registry  # noqa: E402
from scdrugmap.extract.engine import TorchBackbone  # noqa: E402
from scdrugmap.finetune import adapters  # noqa: E402

CELLS = 4


class Source:
    """What a backbone reads of a dataset: name, symbols, counts."""

    value_kind = "counts"

    def __init__(self, X, symbols, name="pc9"):
        self.X, self.names, self.name = sp.csr_matrix(X), np.asarray(symbols, dtype=str), name
        self.n_cells = self.X.shape[0]

    def symbols(self, upper=True):
        return np.char.upper(self.names) if upper else self.names

    def ensembl_ids(self):
        return None

    def rows(self, lo, hi):
        return self.X[lo:hi]


@pytest.fixture(scope="module")
def pc9():
    """20 + 20 real PC9 cells (both classes)."""
    a = ad.read_h5ad(ck.write_pc9_small(Path(__import__("tempfile").mkdtemp()) / "pc9.h5ad", per_class=20))
    return Source(a.X, a.var_names.astype(str))


def _geneformer(folder, pc9):
    return ck.save_geneformer(folder, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, max_position_embeddings=64), {}


def _tgpt(folder, pc9):
    return ck.save_tgpt(folder, n_embd=32, n_layer=2, n_head=2), {}


def _llm(folder, pc9):
    return ck.save_llama(folder), {"top_k": 20}


def _scgpt(folder, pc9):
    from official_scgpt import save_official_scgpt

    return save_official_scgpt(folder, embsize=32, nlayers=2, nheads=2, d_hid=48), {"max_length": 64}


def _scfoundation(folder, pc9):
    from official_scfoundation import save_scfoundation

    return save_scfoundation(folder, hidden=32, depth=2, heads=2), {}


def _cellplm(folder, pc9):
    from official_cellplm import save_cellplm

    save_cellplm(folder, enc_hid=32, enc_layers=2, post_latent_dim=16, dec_hid=16)
    shutil.copy(ck.GENEFORMER_ASSETS / "gene_name_id_dict.pkl", folder / "gene_name_id_dict.pkl")
    return folder, {}


def _uce(folder, pc9):
    from official_uce import write_model_files

    detected = np.asarray((pc9.X > 0).sum(0)).ravel()
    genes = list(pc9.names[detected >= 10][:1500])
    return write_model_files(folder, genes, d_model=40, d_hid=80, output_dim=24), {}


def _scbert(folder, pc9):
    from official_performer import pc9_gene_order, save_scbert

    return save_scbert(folder, pc9_gene_order()), {}


def _celllm(folder, pc9):
    from official_performer import pc9_gene_order, save_celllm

    return save_celllm(folder, pc9_gene_order()), {}


BUILDERS = {"geneformer": _geneformer, "tgpt": _tgpt, "llm": _llm, "scgpt": _scgpt, "scfoundation": _scfoundation,
            "cellplm": _cellplm, "uce": _uce, "scbert": _scbert, "celllm": _celllm}


def test_every_registered_backbone_with_weights_is_covered():
    with_weights = {name for name, cls in registry.all_backbones().items()
                    if issubclass(cls, TorchBackbone) and cls.needs_weights}
    assert with_weights == set(BUILDERS)
    for name in with_weights:
        assert registry.get(name).lora_attention and registry.get(name).lora_mlp, name


def build(name, tmp_path, pc9):
    model_dir, options = BUILDERS[name](tmp_path / name, pc9)
    return registry.get(name)(model_dir=model_dir, device="cpu", batch_size=CELLS, options=options)


def batch_of(model, pc9, n=CELLS):
    cells = model.finetune_cells(pc9, pc9.rows(18, 18 + n))            # both classes
    return model.finetune_collate()([cells[i] for i in range(n)])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_default_targets_pass_the_gradient_check(name, tmp_path, pc9):
    model = build(name, tmp_path, pc9)
    batch = batch_of(model, pc9)
    with torch.no_grad():
        frozen = model.finetune_embed(batch)
    targets, _ = adapters.resolve_targets(model, ["attention", "mlp"])
    attention, _ = adapters.resolve_targets(model, ["attention"])
    assert 0 < len(attention) < len(targets)
    peft_model = adapters.attach(model, targets, rank=4, alpha=8, dropout=0.1, seed=0)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(model.finetune_embed(batch), frozen)   # B = 0: LoRA starts as a no-op
    facts = adapters.check_gradients(model, peft_model, batch, targets)
    assert facts["gradient_check"] == "passed" and facts["check_max_change"] > 0
    assert facts["adapter_tensors_checked"] == 2 * len(targets)
    with torch.no_grad():                                                  # the check restores the adapters
        torch.testing.assert_close(model.finetune_embed(batch), frozen)


class _Toy:
    """A minimal backbone: tokens -> embedding -> one attention layer -> mean."""

    name = "toy"
    device = "cpu"

    def __init__(self, stock: bool):
        from torch import nn

        torch.manual_seed(0)
        self.stock = stock
        self.model = nn.Module()
        self.model.emb = nn.Embedding(10, 8)
        self.model.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.model.eval()

    def lora_unused(self):
        return ()

    def autocast(self):
        return contextlib.nullcontext()

    def finetune_embed(self, batch):
        x = self.model.emb(batch)
        a = self.model.attn
        if self.stock:                                       # the functional path, raw weights
            out, _ = a(x, x, x, need_weights=False)
        else:                                                # the projections called as modules
            q, k, v = torch.nn.functional.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, -1)
            out = a.out_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return out.mean(1)


def test_the_check_catches_multihead_attention_out_proj():
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    stock = _Toy(stock=True)
    targets, _ = adapters.resolve_targets(stock, ["out_proj"])
    assert targets == ["attn.out_proj"]
    peft_model = adapters.attach(stock, targets, rank=2, alpha=2, dropout=0.0, seed=0)
    with pytest.raises(UserError, match=r"1 of 1 modules of 'toy' receive no gradient: attn.out_proj"):
        adapters.check_gradients(stock, peft_model, batch, targets)
    called = _Toy(stock=False)
    peft_model = adapters.attach(called, targets, rank=2, alpha=2, dropout=0.0, seed=0)
    assert adapters.check_gradients(called, peft_model, batch, targets)["gradient_check"] == "passed"


def test_layers_after_the_pooled_one_are_left_out_or_refused(tmp_path, pc9):
    model = build("geneformer", tmp_path, pc9)          # 2 layers; the embedding is layer 0's output
    targets, _ = adapters.resolve_targets(model, ["attention"])
    assert targets and all(t.startswith("encoder.layer.0.") for t in targets)
    explicit, _ = adapters.resolve_targets(model, [r"layer\.1\.attention\.self\.query", "attention"])
    peft_model = adapters.attach(model, explicit, rank=2, alpha=2, dropout=0.0, seed=0)
    with pytest.raises(UserError, match=r"1 of 5 modules .* no gradient: encoder.layer.1.attention.self.query"):
        adapters.check_gradients(model, peft_model, batch_of(model, pc9), explicit)


def test_target_patterns_that_match_nothing(tmp_path, pc9):
    model = build("scbert", tmp_path, pc9)
    with pytest.raises(UserError, match=r"--target-modules 'q_proj' match no linear layer.*fn\.to_q"):
        adapters.resolve_targets(model, ["q_proj"])
    with pytest.raises(UserError, match="not a valid regular expression"):
        adapters.resolve_targets(model, ["to_q("])
    targets, _ = adapters.resolve_targets(model, [r"to_q"])
    assert targets == ["performer.net.layers.0.0.fn.to_q", "performer.net.layers.1.0.fn.to_q"]
