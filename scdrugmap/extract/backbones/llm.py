"""``llm``: any Hugging Face language model over "cell sentences" (scDrugMap's LLM path, generalised).

scDrugMap embedded cells with LLaMa3-8B by writing each cell as text. Here a cell becomes the
sentence of its top-K expressed gene symbols, highest first, separated by spaces (K =
``--option top_k``, default 100; ties in source gene order), as in Cell2Sentence-style
gene-sentence models. Any checkpoint that ``AutoModel`` / ``AutoTokenizer`` load works, decoder
(LlamaForCausalLM and similar) or encoder (BERT-like). The embedding is the mask-aware mean of
the last hidden state over every attended token, the pooling sentence-transformers uses for
mean-pooling models. On CUDA with bf16 the weights are loaded in bf16, so an 8B model fits one
GPU; sentences of a store chunk are sorted by token count and batched.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..engine import CellTokenizer, TorchBackbone, load_strict, masked_mean, resolve_model_dir, sha256_files, weights_file
from ..registry import Option, register


class SentenceTokenizer(CellTokenizer):
    """Top-K symbols of each cell as a sentence, tokenised for the whole block at once (fast tokenizer)."""

    def __init__(self, symbols: np.ndarray, top_k: int, tokenizer, max_tokens: int):
        self.symbols, self.top_k = symbols, top_k
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def sentence(self, block: sp.csr_matrix, i: int) -> str:
        lo, hi = block.indptr[i], block.indptr[i + 1]
        genes, v = block.indices[lo:hi], block.data[lo:hi]
        keep = v > 0
        genes, v = genes[keep], v[keep]
        order = np.lexsort((genes, -v))[: self.top_k]
        return " ".join(self.symbols[genes[order]])

    def prepare(self, block):
        block = sp.csr_matrix(block)
        sentences = [self.sentence(block, i) for i in range(block.shape[0])]
        return self.tokenizer(sentences, truncation=True, max_length=self.max_tokens)["input_ids"]

    def tokens(self, ids, i: int) -> np.ndarray:
        return np.asarray(ids[i])

    def lengths(self, ids) -> np.ndarray:
        return np.array([len(x) for x in ids])


@register
class GeneSentenceLLM(TorchBackbone):
    name = "llm"
    summary = "any HF language model over top-K gene-symbol sentences; mask-aware mean of the last layer"
    default_dim = "model's hidden size"
    default_batch_size = 16
    options = {**TorchBackbone.options,
               "top_k": Option(100, "genes per cell sentence", int, min=1),
               "max_tokens": Option(512, "token limit of a sentence (truncated beyond)", int, min=2)}

    # LoRA targets (``scdrugmap finetune``): the attention and feed-forward projections under the
    # names the common Hugging Face architectures give them (Llama/Mistral/Qwen/OPT ``*_proj``,
    # BERT, GPT-2, GPT-NeoX/Falcon/BLOOM ``query_key_value``, Phi ``Wqkv``/``fc1``/``fc2``, ...); a
    # model that names them otherwise needs ``--target-modules`` (the error lists its layers).
    lora_attention = (r"(q|k|v|o|qkv)_proj", r"attention\.self\.(query|key|value)", r"attention\.output\.dense",
                      r"attn\.c_attn", r"attn\.c_proj", r"query_key_value", r"Wqkv", r"self_attn\.out_proj",
                      r"attention\.dense", r"attn\.out_proj")
    lora_mlp = (r"(gate|up|down|gate_up)_proj", r"intermediate\.dense", r"layer\.\d+\.output\.dense",
                r"mlp\.c_fc", r"mlp\.c_proj", r"fc1", r"fc2", r"dense_h_to_4h", r"dense_4h_to_h", r"mlp\.fc_in",
                r"mlp\.fc_out")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_dir = resolve_model_dir(self.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"{self.model_dir} has no config.json: point --model-dir at a Hugging Face model")
        if self.config["top_k"] < 1 or self.config["max_tokens"] < 2:
            raise UserError("--option top_k must be >= 1 and max_tokens >= 2")
        cfg = AutoConfig.from_pretrained(self.model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except Exception as e:
            raise UserError(f"cannot load the tokenizer in {self.model_dir}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}") from None
        if self.tokenizer.pad_token_id is None:           # decoders often have none: pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.weights = weights_file(self.model_dir) if not any(self.model_dir.glob("*.safetensors.index.json")) \
            else sorted(self.model_dir.glob("*.safetensors"))
        kwargs = {}
        if self.on_cuda and self.precision in ("bf16", "fp16"):
            import torch

            kwargs["dtype"] = torch.bfloat16 if self.precision == "bf16" else torch.float16
        self.model = load_strict(AutoModel, self.model_dir, f"{cfg.model_type} language model", **kwargs)
        self.model = self.model.to(self.device).eval()
        self.model_type = cfg.model_type

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def checkpoint_sha256(self) -> str:
        files = self.weights if isinstance(self.weights, list) else [self.weights]
        return sha256_files([self.model_dir / "config.json", *files])

    def cell_tokenizer(self, source) -> SentenceTokenizer:
        symbols = np.asarray(source.symbols(upper=False)).astype(str)
        return SentenceTokenizer(symbols, self.config["top_k"], self.tokenizer, self.config["max_tokens"])

    def pool(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)

    def params(self) -> dict:
        return {**super().params(), "model_type": self.model_type, "top_k": self.config["top_k"],
                "max_tokens": self.config["max_tokens"], "sentence": "top-K symbols by count, space-separated",
                "pooling": "mask-aware mean of the last hidden state"}
