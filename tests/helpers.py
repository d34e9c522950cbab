"""Helpers shared by several test modules, in one place instead of tests importing each other.

- Word-level prompts: ``word_tokenizer``, ``tokenized_model``, ``string_pairs``.
- The naive reference for AtP, the QK fix and GradDrop (TransformerLens hooks and autograd only,
  nothing from ``atp_plugin.engine``): ``reference``, ``check_against_reference``.
- Left-padded pairs and joint patches written with hooks, one unpadded prompt at a time:
  ``PADDED_*``, ``padded_nodes``, ``joint_patch_effects``, ``real_pair_means``.
- Random float64 SAE-Lens SAEs and transcoders: ``make_sae``, ``make_transcoder``, ``spliced``,
  ``run_attribution``, ``close`` (SAE-Lens is imported inside them: it is slow to import).
- Token pairs for the small Hugging Face models of ``hf_models``: ``bridge_pairs``.

The random models and pairs themselves (``make_model``, ``make_pairs``, ...) are in ``conftest``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from atp_plugin import attribute, metrics
from conftest import VARIANTS, logit_diff_metric, make_bridge, make_model, make_pairs
from hf_models import D_VOCAB

if TYPE_CHECKING:  # annotations only: this module imports under TransformerLens 4 and without SAE-Lens
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformer


# --- word-level prompts -------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(49)]
PAD = "<pad>"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0..w48 plus a pad token (id 49), built offline."""
    vocab = {w: i for i, w in enumerate(WORDS)} | {PAD: len(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # TransformerLens wants a BOS-adding tokenizer (else it fetches one from the Hub); the
    # models here use default_prepend_bos=False, so the BOS is stripped again.
    tok.post_processor = processors.TemplateProcessing(single=f"{PAD} $A", special_tokens=[(PAD, vocab[PAD])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=PAD, bos_token=PAD,
                                   eos_token=PAD, add_bos_token=True, name_or_path="atp-test-words")


def tokenized_model(variant: str) -> HookedTransformer:
    model = make_model(**VARIANTS[variant])
    model.set_tokenizer(word_tokenizer())
    return model


def words_model(host: str):
    """A 3-layer float64 model with a word-level tokenizer and no BOS: ``tokenized_model("ln_gelu")``
    on ``"hooked"``, a GPT-2 TransformerBridge (``make_bridge``, "wI" is token I + 2) on ``"bridge"``."""
    return tokenized_model("ln_gelu") if host == "hooked" else make_bridge(0, 3)


def string_pairs(lengths: list[int], seed: int = 3, n_words: int = len(WORDS)) -> tuple[list[str], list[str]]:
    """Pairs of prompts of the first ``n_words`` words (48 for ``words_model("bridge")``)."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = [], []
    for n in lengths:
        a = torch.randint(0, n_words, (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, n_words, (n,), generator=g), a)
        clean.append(" ".join(WORDS[i] for i in a))
        corrupt.append(" ".join(WORDS[i] for i in b))
    return clean, corrupt


# --- the naive reference for AtP, the QK fix and GradDrop ---------------------------------

SITES = {
    "attn_q": "attn.hook_q",
    "attn_k": "attn.hook_k",
    "attn_v": "attn.hook_v",
    "attn_z": "attn.hook_z",
    "mlp_neurons": "mlp.hook_post",
    "resid_pre": "hook_resid_pre",
}
QK_NODES = ("attn_q", "attn_k")
ATP_METHODS = ("atp", "atp+qk", "atp+gd", "atp*")


def node_types(model: HookedTransformer) -> list[str]:
    return [n for n in SITES if not (n == "mlp_neurons" and model.cfg.attn_only)]


def hook_name(node_type: str, layer: int) -> str:
    return f"blocks.{layer}.{SITES[node_type]}"


def reference_gradients(model: HookedTransformer, clean: torch.Tensor, metric, names: list[str],
                        cut: int | None = None) -> dict[str, torch.Tensor]:
    """dL/d(hook value) at ``names`` from one clean forward + backward of the summed metric (pairs
    are independent); with ``cut``, layer ``cut``'s attention and MLP outputs are detached
    (forward values unchanged, gradient into that layer cut)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):  # by the name asked for: on a Bridge, hook.name is that of the point it aliases
        def hook(x: torch.Tensor, hook) -> torch.Tensor:
            acts[name] = x
            return x
        return hook

    hooks = [(name, keep(name)) for name in names]
    if cut is not None:
        hooks.append((f"blocks.{cut}.hook_attn_out", lambda x, hook: x.detach()))
        if not model.cfg.attn_only:
            hooks.append((f"blocks.{cut}.hook_mlp_out", lambda x, hook: x.detach()))
    with torch.enable_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        total = metric(logits, torch.arange(clean.shape[0])).sum()
        grads = torch.autograd.grad(total, [acts[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(acts[n]) if g is None else g.detach() for n, g in zip(names, grads)}


def pattern_changes(model: HookedTransformer, clean: torch.Tensor, noise: dict[str, torch.Tensor],
                    layer: int, which: str) -> torch.Tensor:
    """A' - A at layer ``layer`` for every query (``which="q"``) or key (``"k"``) node, each from a
    real forward pass with only that node's pre-rotary vector set to its corrupt value:
    ``[N, T, heads of the node type, n_heads, T, T]``."""
    name = f"blocks.{layer}.attn.hook_{which}"
    n, t = clean.shape
    nh = noise[name].shape[2]  # n_heads for q, n_kv for k
    pair, pos, head = (g.reshape(-1) for g in torch.meshgrid(
        torch.arange(n), torch.arange(t), torch.arange(nh), indexing="ij"))
    copies = clean[pair]  # copy c patches (pair[c], pos[c], head[c])
    rows = torch.arange(len(pair))
    grabbed: dict[str, torch.Tensor] = {}

    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[rows, pos, head] = noise[name][pair, pos, head]
        return x

    def grab(x: torch.Tensor, hook) -> None:
        grabbed["A"] = x.detach().clone()

    pattern = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=pattern)
        model.run_with_hooks(copies, fwd_hooks=[(name, patch), (pattern, grab)], stop_at_layer=layer + 1)
    new = grabbed["A"].reshape(n, t, nh, *grabbed["A"].shape[1:])  # [N, T, nh, n_heads, T, T]
    return new - cache[pattern][:, None, None]


def first_order(node_type: str, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(noise - clean) . dL/dn per node: the dot product runs over the node's vector."""
    prod = delta * grad
    return prod if node_type == "mlp_neurons" else prod.sum(-1)  # [N, T, d_mlp] / [N, T, head] / [N, T]


def reference(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric
              ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
    """method -> (scores, signed or None) per node type, each ``[n_layers, T, *node]``."""
    n_layers = model.cfg.n_layers
    types = node_types(model)
    names = [hook_name(nt, layer) for nt in types for layer in range(n_layers)]
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    with torch.no_grad():
        _, noise = model.run_with_cache(corrupt)
        _, clean_cache = model.run_with_cache(clean)
    changes = {(layer, w): pattern_changes(model, clean, noise, layer, w)
               for layer in range(n_layers) for w in "qk"}

    def estimates(grads: dict[str, torch.Tensor], qk: bool) -> dict[str, torch.Tensor]:
        """Per-pair estimates ``[N, n_layers, T, *node]`` under the gradients ``grads``."""
        out = {}
        for nt in types:
            per_layer = []
            for layer in range(n_layers):
                if qk and nt in QK_NODES:
                    change = changes[layer, nt[-1]]  # [N, T, nh, n_heads, T, T]
                    G = grads[patterns[layer]][:, None, None]  # [N, 1, 1, n_heads, T, T]
                    per_layer.append((change * G).sum((-3, -2, -1)))
                else:
                    h = hook_name(nt, layer)
                    per_layer.append(first_order(nt, noise[h] - clean_cache[h], grads[h]))
            out[nt] = torch.stack(per_layer, 1)
        return out

    full = reference_gradients(model, clean, metric, names + patterns)
    result = {}
    for method, qk in (("atp", False), ("atp+qk", True)):
        per_pair = estimates(full, qk)
        result[method] = ({k: v.abs().mean(0) for k, v in per_pair.items()},
                          {k: v.mean(0) for k, v in per_pair.items()})
    if n_layers > 1:
        cuts = [reference_gradients(model, clean, metric, names + patterns, cut=layer) for layer in range(n_layers)]
        for method, qk in (("atp+gd", False), ("atp*", True)):
            per_cut = [estimates(g, qk) for g in cuts]
            c_gd = {nt: sum(e[nt].abs() for e in per_cut) / (n_layers - 1) for nt in types}  # [N, ...]
            result[method] = ({k: v.mean(0) for k, v in c_gd.items()}, None)
    return result


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the reference is identically zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


def check_against_reference(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric,
                            **options) -> None:
    """Every method's scores and signed values equal the naive reference; ``options`` go to attribute()."""
    expected = reference(model, clean, corrupt, metric)
    types = node_types(model)
    for method in ATP_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the few-layers GradDrop warning
            got = attribute(model, clean, corrupt, metric, nodes=types, method=method, **options)
        scores, signed = expected[method]
        for nt in types:
            assert_matches(got.scores[nt], scores[nt], f"{method} scores of {nt}")
            if signed is None:
                assert torch.isnan(got.signed[nt]).all(), f"{method} has no signed value, expected NaN"
            else:
                assert_matches(got.signed[nt], signed[nt], f"{method} signed of {nt}")


# --- left-padded pairs and joint patches written with hooks ------------------------------------

# Left-padded pairs of lengths 3, 5 and 4 (padded width 5) for a word-level tokenizer ("wI" -> id I):
# the longest pair's corrupt prompt differs at position 0, which is padding in the other two pairs.
PADDED_CLEAN = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9 w10 w11 w12"]
PADDED_CORRUPT = ["w20 w2 w3", "w24 w5 w21 w7 w8", "w9 w22 w11 w23"]
PADDED_ANSWERS, PADDED_WRONGS = [5, 9, 30], [7, 2, 11]
WIDTH = 5
PADDED_TYPES = ["attn_v", "resid_pre"]
HOOKS = {"attn_v": "blocks.{}.attn.hook_v", "resid_pre": "blocks.{}.hook_resid_pre"}
#: (node_type, layer, pos counted from the left of the padded width, head or None)
Node = tuple[str, int, int, int | None]


def padded_metric() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logit(answer) - logit(wrong) at the last token of each padded pair."""
    return metrics.logit_diff(PADDED_ANSWERS, PADDED_WRONGS)


def padded_nodes(model: HookedTransformer) -> list[Node]:
    """Every attn_v and resid_pre node, in the order of the subsets' columns (as
    ``backends.baselines.NodeSet`` orders them: site, i.e. node type then layer, then flat index over
    [pos, head]); no position is padding in every pair."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    return ([("attn_v", layer, pos, head) for layer in range(n_layers) for pos in range(WIDTH)
             for head in range(n_heads)]
            + [("resid_pre", layer, pos, None) for layer in range(n_layers) for pos in range(WIDTH)])


def node_label(node: Node) -> str:
    """The node's label in ``AttributionResult.to_frame()``, e.g. \"attn_v L0 @2 H1\"."""
    node_type, layer, pos, head = node
    return f"{node_type} L{layer} @{pos}" + ("" if head is None else f" H{head}")


def padded_lengths(model: HookedTransformer) -> list[int]:
    """Token count of each padded pair's clean prompt."""
    return [len(model.to_tokens(s, prepend_bos=False)[0]) for s in PADDED_CLEAN]


def joint_patch_effects(model: HookedTransformer, sets: list[list[Node]]) -> np.ndarray:
    """``[sets, pairs]``: L(clean | every node of the set <- its corrupt value) - L(clean), each
    clean prompt unpadded (one copy per set in a batch of that prompt alone) with hooks; a node at
    a position that is padding in a pair does not exist there and is not patched."""
    names = {HOOKS[t].format(layer) for nodes in sets for t, layer, _, _ in nodes}
    out = np.zeros((len(sets), len(PADDED_CLEAN)))
    for i, (c, x, a, w) in enumerate(zip(PADDED_CLEAN, PADDED_CORRUPT, PADDED_ANSWERS, PADDED_WRONGS)):
        clean, corrupt = model.to_tokens(c, prepend_bos=False), model.to_tokens(x, prepend_bos=False)  # [1, t]
        offset = WIDTH - clean.shape[1]  # left padding of this pair
        where: dict[str, list[tuple]] = {}  # hook -> indices (copy, t(, head)) to patch
        for j, nodes in enumerate(sets):
            for node_type, layer, pos, head in nodes:
                if pos >= offset:
                    where.setdefault(HOOKS[node_type].format(layer), []).append(
                        (j, pos - offset) + (() if head is None else (head,)))

        with torch.no_grad():
            _, cache = model.run_with_cache(corrupt, names_filter=lambda name: name in names)
            base = model(clean)[0, -1]  # [vocab]

        def patch(name: str, where=where, cache=cache):  # by the name asked for: on a Bridge, hook.name
            def hook(act: torch.Tensor, hook) -> torch.Tensor:  # is that of the point the name aliases
                act = act.clone()
                for index in where[name]:
                    act[index] = cache[name][(0,) + index[1:]]
                return act
            return hook

        with torch.no_grad():
            logits = model.run_with_hooks(clean.expand(len(sets), -1),
                                          fwd_hooks=[(h, patch(h)) for h in where])[:, -1]  # [sets, vocab]
        out[:, i] = ((logits[:, a] - logits[:, w]) - (base[a] - base[w])).numpy()
    return out


def real_pair_means(model: HookedTransformer, effects: np.ndarray, positions: list[int]) -> np.ndarray:
    """``[sets, len(positions)]``: each set's effect averaged over the pairs where the position is real."""
    sizes = padded_lengths(model)
    return np.stack([effects[:, [i for i, n in enumerate(sizes) if pos >= WIDTH - n]].mean(1) for pos in positions], 1)


# --- random SAE-Lens SAEs and transcoders ------------------------------------------------------

#: SAE architecture -> (SAE-Lens SAE class, its config class, config options); names, so that
#: importing this module does not import SAE-Lens
SAE_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "standard": ("StandardSAE", "StandardSAEConfig", {}),
    "topk": ("TopKSAE", "TopKSAEConfig", dict(k=4)),
    "topk_rescaled": ("TopKSAE", "TopKSAEConfig", dict(k=4, rescale_acts_by_decoder_norm=True)),
    "jumprelu_no_b_dec_in": ("JumpReLUSAE", "JumpReLUSAEConfig", dict(apply_b_dec_to_input=False)),
    "gated": ("GatedSAE", "GatedSAEConfig", {}),
    "layer_norm": ("StandardSAE", "StandardSAEConfig", dict(normalize_activations="layer_norm")),
    "constant_norm": ("JumpReLUSAE", "JumpReLUSAEConfig", dict(normalize_activations="constant_norm_rescale")),
}
SAE_N, SAE_T = 3, 5  # pairs and tokens of run_attribution's random pairs


def make_sae(arch: str, hook: str, d_in: int = 32, d_sae: int = 12, seed: int = 0, **extra):
    """A random float64 SAE of architecture ``arch`` at ``hook``, biased so that features are active
    on some inputs and not on others."""
    import sae_lens

    cls_name, cfg_name, kw = SAE_ARCHS[arch]
    cls, cfg_cls = getattr(sae_lens, cls_name), getattr(sae_lens, cfg_name)
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, dtype="float64", **{**kw, **extra})
    cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    sae = cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.mul_(3.0)
            elif name == "threshold":
                p.uniform_(0.0, 0.2)
            elif name.startswith(("b_", "r_mag")):
                p.normal_(0, 0.3)
    return sae.eval()


def spliced(model: HookedTransformer, saes: list) -> HookedSAETransformer:
    """The same model as a ``HookedSAETransformer`` with ``saes`` spliced in (error term on)."""
    from sae_lens import HookedSAETransformer

    out = HookedSAETransformer(model.cfg)
    out.load_state_dict(model.state_dict())
    for sae in saes:
        out.add_sae(sae, use_error_term=True)
    return out.eval()


def run_attribution(model, nodes, method: str, n: int = SAE_N, t: int = SAE_T):
    """``attribute()`` of ``nodes`` by ``method`` on ``n`` random pairs of ``t`` tokens (warnings silenced)."""
    clean, corrupt = make_pairs(n, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(model, clean, corrupt, logit_diff_metric(n), nodes=nodes, method=method)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    """``actual`` equals ``expected`` to ``rtol`` (and 1e-10 of its scale), which must not be all zero."""
    scale = float(expected.abs().max())
    assert scale > 1e-6, f"{what}: the expected values are (nearly) all zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


#: transcoder architecture -> (SAE-Lens class, its config class), by name
TRANSCODER_ARCHS: dict[str, tuple[str, str]] = {
    "transcoder": ("Transcoder", "TranscoderConfig"),
    "skip": ("SkipTranscoder", "SkipTranscoderConfig"),
    "jumprelu": ("JumpReLUTranscoder", "JumpReLUTranscoderConfig"),
    "jumprelu_skip": ("JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig"),
}
D_SAE = 12  # features of make_transcoder's transcoders


def make_transcoder(arch: str, hook_in: str, hook_out: str, *, d_in: int = 32, d_out: int = 32, seed: int = 0):
    """A random float64 transcoder ``hook_in -> hook_out``, biased so that features are active on
    some inputs and not on others; skip transcoders get a non-zero skip matrix."""
    import sae_lens

    cls, cfg_cls = (getattr(sae_lens, name) for name in TRANSCODER_ARCHS[arch])
    cfg = cfg_cls(d_in=d_in, d_sae=D_SAE, d_out=d_out, dtype="float64", apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = hook_in, hook_out
    torch.manual_seed(seed)
    tc = cls(cfg)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            if name == "W_enc":
                p.mul_(3.0)
            elif name == "threshold":
                p.uniform_(0.0, 0.2)
            elif name.startswith("b_"):
                p.normal_(0, 0.3)
            elif name == "W_skip":
                p.normal_(0, 0.1)
    return tc.eval()


# --- pairs for the Hugging Face models of hf_models -----------------------------------------------

def bridge_pairs(n: int = 3, t: int = 6, seed: int = 1):
    """Token pairs over the vocabulary of ``hf_models`` that differ at two positions, and a
    logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, D_VOCAB, (n, t), generator=g)
    corrupt = clean.clone()
    for pos in (1, t - 3):
        corrupt[:, pos] = torch.randint(2, D_VOCAB, (n,), generator=g)
    metric = metrics.logit_diff(torch.randint(2, D_VOCAB, (n,), generator=g),
                                torch.randint(2, D_VOCAB, (n,), generator=g))
    return clean, corrupt, metric


def random_simple_sae(seed: int, hook_in: str, hook_out: str | None = None, *, d: int = 32, d_sae: int = 16,
                      activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu):
    """A random float64 ``saes.SimpleSAE`` of width ``d`` reading ``hook_in`` (a transcoder with
    ``hook_out``), biased so that features are on for some inputs and off for others."""
    from atp_plugin.saes import SimpleSAE
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return SimpleSAE(r(d, d_sae) / 4, r(d_sae) * 0.3, r(d_sae, d) / 4, r(d) * 0.1, activation=activation,
                     hook_name=hook_in, hook_name_out=hook_out)


def sparsify_coder(transcoder: bool = False, *, activation: str = "topk", skip: bool = False, seed: int = 0,
                   d: int = 32, d_sae: int = 24, k: int = 4):
    """A random float64 sparsify ``SparseCoder`` (an SAE, or a transcoder with ``transcoder``) of width
    d -> d, k of d_sae latents active; biases and decoder randomised (sparsify starts them at 0)."""
    import pytest
    sparsify = pytest.importorskip("sparsify", reason="needs EleutherAI's sparsify: pip install eai-sparsify (part of "
                                   "atp-plugin[test])")
    make = sparsify.TranscoderConfig if transcoder else sparsify.SaeConfig
    torch.manual_seed(seed)
    coder = sparsify.Sae(d, make(num_latents=d_sae, k=k, activation=activation, skip_connection=skip),
                         dtype=torch.float64)
    with torch.no_grad():  # every weight drawn here, so that the coder does not change with sparsify's own init
        coder.encoder.weight.copy_(torch.randn(d_sae, d, dtype=torch.float64) * 3.0 / math.sqrt(3 * d))
        coder.encoder.bias.normal_(0, 0.3)
        coder.b_dec.normal_(0, 0.3)
        coder.W_dec.copy_(torch.randn(d_sae, d, dtype=torch.float64) * 0.3)
        if skip:
            coder.W_skip.normal_(0, 0.1)
    return coder.eval()
