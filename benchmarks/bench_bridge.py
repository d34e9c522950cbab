"""Speed benchmark: ``attribute()`` on a ``TransformerBridge`` against the same call on a
``HookedTransformer`` with the same weights, and the plain Hugging Face forward + backward floor.

Model: a random Hugging Face GPT-2 the size of ``bench_atp.py``'s (6 layers, d_model 256, 8 heads,
d_mlp 1024, d_vocab 1000, float32), saved to a temporary directory and loaded offline twice: as a
``TransformerBridge`` in compatibility mode and (TransformerLens 3 only) as a ``HookedTransformer``
with ``from_pretrained``'s weight processing. Batch: 16 token-aligned pairs of 24 tokens. Nodes:
attn_q, attn_k, attn_v, attn_z, mlp_neurons. Times: medians of ``--repeats`` interleaved rounds after
one warm-up (benchmarks/timing.py), so the first call's one-off probing is not in them.

- HF floor: on the wrapped ``GPT2LMHeadModel``, one no-grad forward of the clean prompts plus one
  forward + backward of the summed metric to the input embeddings (no parameter gradients): the least
  any gradient-based attribution can cost on this model.
- HookedTransformer, Bridge: ``atp_plugin.attribute(...)`` end to end.
- Bridge / HookedTransformer: the Bridge host's overhead; the target is 1.3.

Under TransformerLens 4 (no ``HookedTransformer``) only the floor and Bridge columns are measured.

Usage: python benchmarks/bench_bridge.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge

import atp_plugin
from atp_plugin import metrics
from random_inputs import random_pairs  # this script's folder is on sys.path
from timing import interleaved_times

NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons"]
METHODS = ("atp", "atp+qk", "atp*")
N_PAIRS, N_TOKENS, D_VOCAB = 16, 24, 1000
TARGET = 1.3


def save_model(path: Path, seed: int = 0) -> Path:
    """A random float32 GPT-2 and a word-level tokenizer over ``D_VOCAB`` words, saved under ``path``
    (query/key weights doubled so attention patterns are not uniform, as in a trained model)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=8, n_inner=1024, vocab_size=D_VOCAB, n_positions=64,
                                  n_ctx=64, bos_token_id=0, eos_token_id=0, initializer_range=0.05)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * cfg.n_embd].mul_(2.0)
    model.save_pretrained(path)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(D_VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="w0", eos_token="w0",
                                         unk_token="w0").save_pretrained(path)
    return path


def load_bridge(path: Path) -> TransformerBridge:
    """The saved model as a float32 ``TransformerBridge`` in compatibility mode, offline."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer,
                                                 dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def load_hooked(path: Path) -> Any:
    """The saved model as a float32 ``HookedTransformer`` built as ``from_pretrained`` builds one
    (fold LayerNorm, center writing weights and unembedding, fold value biases); None under
    TransformerLens 4, which has no ``HookedTransformer``."""
    try:
        from transformer_lens import HookedTransformer
        from transformer_lens import loading_from_pretrained as loading
    except ImportError:
        return None
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = loading.get_pretrained_model_config(str(path), dtype=torch.float32, fold_ln=True)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, transformers.AutoTokenizer.from_pretrained(path))
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True)
    return model.eval()


def make_task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """16 token-aligned pairs of 24 tokens (corrupt differs at about a quarter of the positions) and a
    logit-difference metric between per-pair random answer and wrong tokens."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = random_pairs(N_PAIRS, N_TOKENS, D_VOCAB, g)
    answer, wrong = torch.randint(0, D_VOCAB, (2, N_PAIRS), generator=g)
    return clean, corrupt, metrics.logit_diff(answer, wrong)


def hf_floor(hf_model: Any, clean: torch.Tensor, metric: Callable[..., torch.Tensor]) -> None:
    """One no-grad forward, then one forward + backward of the summed metric to the input embeddings."""
    idx = torch.arange(clean.shape[0])
    with torch.no_grad():
        hf_model(clean)
    embeds = hf_model.get_input_embeddings()(clean).detach().requires_grad_(True)
    logits = hf_model(inputs_embeds=embeds).logits
    torch.autograd.grad(metric(logits, idx).sum(), embeds)


def measure(bridge: TransformerBridge, hooked: Any, repeats: int) -> dict[str, float]:
    """Median wall times (s): ``floor`` and, per method, ``<method> bridge`` / ``<method> hooked``."""
    clean, corrupt, metric = make_task()

    def attribute(model: Any, method: str) -> Callable[[], object]:
        return lambda: atp_plugin.attribute(model, clean, corrupt, metric, nodes=NODES, method=method,
                                            batch_size=N_PAIRS, progress=False)

    fns: dict[str, Callable[[], object]] = {"floor": lambda: hf_floor(bridge.original_model, clean, metric)}
    for method in METHODS:
        if hooked is not None:
            fns[f"{method} hooked"] = attribute(hooked, method)
        fns[f"{method} bridge"] = attribute(bridge, method)
    return interleaved_times(fns, repeats)


def table(times: dict[str, float], has_hooked: bool) -> str:
    """The Markdown table of ``times``: one row per method."""
    if has_hooked:
        lines = ["| method | HF fwd+bwd floor (s) | HookedTransformer (s) | Bridge (s) | Bridge / HookedTransformer "
                 "| target |", "|---|---:|---:|---:|---:|---|"]
    else:
        lines = ["| method | HF fwd+bwd floor (s) | Bridge (s) | Bridge / floor |", "|---|---:|---:|---:|"]
    for method in METHODS:
        bridge = times[f"{method} bridge"]
        if has_hooked:
            ratio = bridge / times[f"{method} hooked"]
            verdict = "met" if ratio <= TARGET else "NOT met"
            lines.append(f"| {method} | {times['floor']:.3f} | {times[f'{method} hooked']:.3f} | {bridge:.3f} "
                         f"| {ratio:.2f} ({verdict}) | <= {TARGET} |")
        else:
            lines.append(f"| {method} | {times['floor']:.3f} | {bridge:.3f} | {bridge / times['floor']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp))
        bridge, hooked = load_bridge(path), load_hooked(path)
    times = measure(bridge, hooked, args.repeats)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"transformer-lens {version('transformer-lens')}, transformers {version('transformers')}, "
          f"torch {torch.__version__}; {args.threads} thread(s) on {os.cpu_count()} CPUs (load average {load} at the "
          f"end); median of {args.repeats} interleaved rounds after a warm-up\n")
    print(table(times, hooked is not None))

if __name__ == "__main__":
    main()
