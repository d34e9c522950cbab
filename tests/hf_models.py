"""Tiny Hugging Face models with random float64 weights, saved to a local directory, and the two
ways TransformerLens loads them offline: a ``TransformerBridge`` in compatibility mode and a
``HookedTransformer`` built the way ``HookedTransformer.from_pretrained`` builds one (which only
accepts hub names, so its steps are spelled out here for a local directory)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformer_lens.model_bridge import TransformerBridge

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

D_VOCAB = 50
WORDS = ["<pad>", "<bos>"] + [f"w{i}" for i in range(D_VOCAB - 2)]  # token id of "w{i}" is i + 2


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over ``WORDS`` that prepends <bos>, saved with the model."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                         eos_token="<bos>", unk_token="<pad>").save_pretrained(path)


def save_gpt2(path: Path, seed: int = 0, n_layer: int = 2, qk_gain: float = 2.0, **overrides) -> Path:
    """A random GPT-2 (d_model 32, 4 heads, d_mlp 128) saved with its tokenizer under ``path``.

    Query/key weights are multiplied by ``qk_gain`` so attention is far from uniform (the QK fix
    then differs visibly from AtP).
    """
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{"n_layer": n_layer, "n_embd": 32, "n_head": 4, "vocab_size": D_VOCAB,
                                     "n_positions": 16, "n_ctx": 16, "bos_token_id": 1, "eos_token_id": 1,
                                     "pad_token_id": 0, "initializer_range": 0.1, **overrides})
    model = transformers.GPT2LMHeadModel(cfg).to(torch.float64)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * cfg.n_embd].mul_(qk_gain)
            for p in (block.attn.c_attn.bias, block.attn.c_proj.bias, block.mlp.c_fc.bias):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def save_llama(path: Path, seed: int = 0, qk_gain: float = 8.0) -> Path:
    """A random 2-layer Llama (rotary, grouped-query attention with 2 kv-heads) under ``path``."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=D_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def load_bridge(path: Path, compatibility: bool = True) -> TransformerBridge:
    """The saved model as a float64 ``TransformerBridge``, offline."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=torch.float64)
    if compatibility:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def load_hooked(path: Path) -> HookedTransformer:
    """The saved model as a float64 ``HookedTransformer`` with from_pretrained's default processing
    (fold LayerNorm, center writing weights and unembedding, fold value biases). TransformerLens 3 only."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    cfg = loading.get_pretrained_model_config(str(path), dtype=torch.float64, fold_ln=True)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, transformers.AutoTokenizer.from_pretrained(path))
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True)
    return model.eval()


#: Tiny configurations of the architecture families users run, by family name: each exercises the
#: feature its family is known for (GQA, partial rotary and parallel residual, a sliding window shorter
#: than the test prompts, qkv biases, per-head and all-head q/k norms, soft-capping, post-norms, fused qkv).
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16, "n_ctx": 16}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "intermediate_size": 64, "rotary_pct": 0.5, "use_parallel_residual": True,
                                   "max_position_embeddings": 16}),
    "llama": ("LlamaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16}),
    "mistral": ("MistralConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
                                  "sliding_window": 3}),
    "qwen2": ("Qwen2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16}),
    "qwen3": ("Qwen3Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 8,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16}),
    "gemma2": ("Gemma2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "head_dim": 8,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
                                "sliding_window": 3, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
                                "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "max_position_embeddings": 16, "sliding_window": 3, "query_pre_attn_scalar": 8}),
    "phi3": ("Phi3Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 16,
                            "original_max_position_embeddings": 16}),
    "olmo2": ("Olmo2Config", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 16}),
}


def save_family(family: str, path: Path, seed: int = 0, qk_gain: float = 4.0) -> Path:
    """A random float64 model of ``family`` (a key of ``FAMILIES``) saved with its tokenizer under
    ``path``. Attention is made far from uniform by multiplying the query/key scale by ``qk_gain``:
    the q/k norms' weights where the family normalises q and k (a projection's scale would be
    normalised away), else the q/k projection weights (the whole fused qkv projection where fused)."""
    torch.manual_seed(seed)
    config_cls, fields = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(vocab_size=D_VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                                            tie_word_embeddings=False, **fields)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float64)
    params = dict(model.named_parameters())
    normed = any(n.endswith(("q_norm.weight", "q_layernorm.weight")) for n in params)
    with torch.no_grad():
        for name, p in params.items():
            if normed and name.endswith(("q_norm.weight", "k_norm.weight")):
                if family.startswith("gemma"):
                    p.fill_(qk_gain - 1.0)  # Gemma's norms scale by 1 + weight
                else:
                    p.mul_(qk_gain)
            elif not normed and name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight",
                                               "query_key_value.weight", "qkv_proj.weight")):
                p.mul_(qk_gain)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path
