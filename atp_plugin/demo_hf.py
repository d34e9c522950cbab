"""The bundled demo model as a Hugging Face GPT-2 directory, for trying ``atp rank --model <dir>``.

A researcher's own model usually arrives as a Hugging Face directory; this writes the demo model
in that form so the local-directory path (TransformerBridge, compatibility mode) can be run offline
on a model that really solves a task, and compared with ``--model demo``:

    python -m atp_plugin.demo_hf demo-hf
    atp rank --model ./demo-hf --clean ... --corrupt ... --answer " Mary" --wrong " John"

The architecture is GPT-2's (LayerNorm, exact GELU, learned positions, untied unembedding). GPT-2
has no unembedding bias, so the demo model's ``b_U`` (at most 0.07 in magnitude) is left out: every
logit moves by a per-token constant, which cancels in a logit difference between two runs, so
attributions and patching effects on logit-difference metrics are those of the demo model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import einops
import torch
import transformers
from transformer_lens import HookedTransformer

from .demo_task import load_demo_model


def gpt2_state_dict(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """A ``GPT2LMHeadModel`` state dict holding ``model``'s weights (TransformerLens's GPT-2 import, inverted)."""
    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.W_E,                   # [d_vocab, d_model]
        "transformer.wpe.weight": model.W_pos,                 # [n_ctx, d_model]
        "transformer.ln_f.weight": model.ln_final.w,
        "transformer.ln_f.bias": model.ln_final.b,
        "lm_head.weight": model.W_U.T,                         # [d_vocab, d_model]
    }
    for l, block in enumerate(model.blocks):
        attn, h = block.attn, f"transformer.h.{l}"
        # Conv1D weights are [in, out]; TransformerLens's are [head, d_model, d_head]
        qkv = [einops.rearrange(w, "head d_model d_head -> d_model (head d_head)") for w in (attn.W_Q, attn.W_K, attn.W_V)]
        sd |= {
            f"{h}.ln_1.weight": block.ln1.w, f"{h}.ln_1.bias": block.ln1.b,
            f"{h}.ln_2.weight": block.ln2.w, f"{h}.ln_2.bias": block.ln2.b,
            f"{h}.attn.c_attn.weight": torch.cat(qkv, dim=1),  # [d_model, 3 * d_model]
            f"{h}.attn.c_attn.bias": torch.cat([b.flatten() for b in (attn.b_Q, attn.b_K, attn.b_V)]),
            f"{h}.attn.c_proj.weight": einops.rearrange(attn.W_O, "head d_head d_model -> (head d_head) d_model"),
            f"{h}.attn.c_proj.bias": attn.b_O,
            f"{h}.mlp.c_fc.weight": block.mlp.W_in,            # [d_model, d_mlp]
            f"{h}.mlp.c_fc.bias": block.mlp.b_in,
            f"{h}.mlp.c_proj.weight": block.mlp.W_out,         # [d_mlp, d_model]
            f"{h}.mlp.c_proj.bias": block.mlp.b_out,
        }
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def save_demo_as_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the demo model and its tokenizer to ``path`` as a Hugging Face GPT-2 directory."""
    model = load_demo_model(dtype=dtype)
    cfg = model.cfg
    tok = model.tokenizer
    config = transformers.GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="gelu", layer_norm_epsilon=cfg.eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    hf = transformers.GPT2LMHeadModel(config).to(dtype)
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    if unexpected or any(not k.endswith("attn.bias") and not k.endswith("masked_bias") for k in missing):
        raise RuntimeError(f"GPT-2 export does not match: missing {missing}, unexpected {unexpected}")
    path = Path(path)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the bundled demo model as a Hugging Face GPT-2 directory.")
    parser.add_argument("path", help="directory to write (created)")
    path = save_demo_as_hf(parser.parse_args().path)
    print(f"wrote {path}/ (GPT-2 architecture, with its tokenizer); try: atp rank --model {path} ...")


if __name__ == "__main__":
    main()
