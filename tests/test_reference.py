"""AtP, the QK fix and GradDrop against naive references written here (docs/method.md, sections 2-4).

The references use only TransformerLens hooks and ``torch.autograd``: a cache of the corrupt
run, one clean forward + backward for dL/d(site), one REAL forward pass per query/key node with
only that (pre-rotary) vector patched to read the new attention pattern, and, for GradDrop, one
forward + backward per layer with that layer's attention and MLP outputs detached. Nothing from
``atp_plugin.engine`` is used to compute expected values.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from atp_plugin import attribute, metrics
from conftest import VARIANTS, logit_diff_metric, make_model, make_pairs

SITES = {
    "attn_q": "attn.hook_q",
    "attn_k": "attn.hook_k",
    "attn_v": "attn.hook_v",
    "attn_z": "attn.hook_z",
    "mlp_neurons": "mlp.hook_post",
    "resid_pre": "hook_resid_pre",
}
QK_NODES = ("attn_q", "attn_k")
METHODS = ("atp", "atp+qk", "atp+gd", "atp*")


def node_types(model: HookedTransformer) -> list[str]:
    return [n for n in SITES if not (n == "mlp_neurons" and model.cfg.attn_only)]


def hook_name(node_type: str, layer: int) -> str:
    return f"blocks.{layer}.{SITES[node_type]}"


def clean_gradients(model: HookedTransformer, clean: torch.Tensor, metric, names: list[str],
                    cut: int | None = None) -> dict[str, torch.Tensor]:
    """dL/d(hook value) at ``names`` from one clean forward + backward of the summed metric (pairs
    are independent); with ``cut``, layer ``cut``'s attention and MLP outputs are detached
    (forward values unchanged, gradient into that layer cut)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        acts[hook.name] = x
        return x

    hooks = [(name, keep) for name in names]
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

    full = clean_gradients(model, clean, metric, names + patterns)
    result = {}
    for method, qk in (("atp", False), ("atp+qk", True)):
        per_pair = estimates(full, qk)
        result[method] = ({k: v.abs().mean(0) for k, v in per_pair.items()},
                          {k: v.mean(0) for k, v in per_pair.items()})
    if n_layers > 1:
        cuts = [clean_gradients(model, clean, metric, names + patterns, cut=layer) for layer in range(n_layers)]
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
    for method in METHODS:
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


def test_reference_every_variant(variant: str) -> None:
    """Every node type and every AtP method on every model variant of conftest.VARIANTS."""
    model = make_model(**VARIANTS[variant])
    clean, corrupt = make_pairs(3, 6)
    check_against_reference(model, clean, corrupt, logit_diff_metric(3))


@pytest.mark.parametrize("variant", ["ln_gelu", "gqa"])
def test_reference_across_batches(variant: str) -> None:
    """Pairs split over several batches (2 + 2 + 1): every batch adds its pairs to the means."""
    model = make_model(**VARIANTS[variant])
    clean, corrupt = make_pairs(5, 6, seed=4)
    check_against_reference(model, clean, corrupt, logit_diff_metric(5), batch_size=2)


def test_reference_ungrouped_gqa() -> None:
    """TransformerLens's ungroup_grouped_query_attention gives hook_k/hook_v a copy per query head:
    nodes and the QK fix follow the hook (n_heads keys and values), not the config's kv-heads."""
    model = make_model(**VARIANTS["gqa"], ungroup_grouped_query_attention=True)
    clean, corrupt = make_pairs(3, 6)
    result = attribute(model, clean, corrupt, logit_diff_metric(3), nodes=["attn_k", "attn_v"], method="atp+qk")
    assert result.scores["attn_k"].shape == result.scores["attn_v"].shape == (3, 6, model.cfg.n_heads)
    check_against_reference(model, clean, corrupt, logit_diff_metric(3))


def test_reference_nonlinear_metric() -> None:
    """log P(answer) is not linear in the logits: the gradient still has to be exact."""
    model = make_model(**VARIANTS["gqa"])
    clean, corrupt = make_pairs(3, 6, seed=5)
    check_against_reference(model, clean, corrupt, metrics.log_prob(torch.tensor([3, 17, 41])))


def test_qk_fix_differs_from_atp() -> None:
    """The models are saturated enough that the QK fix changes q/k estimates (else the reference
    comparisons above could not tell the two apart)."""
    model = make_model(**VARIANTS["ln_gelu"])
    clean, corrupt = make_pairs(3, 6)
    expected = reference(model, clean, corrupt, logit_diff_metric(3))
    for nt in QK_NODES:
        diff = (expected["atp"][1][nt] - expected["atp+qk"][1][nt]).abs().max()
        assert diff > 1e-3 * expected["atp+qk"][1][nt].abs().max(), nt
    diff = (expected["atp+gd"][0]["attn_z"] - expected["atp"][0]["attn_z"]).abs().max()
    assert diff > 1e-3 * expected["atp"][0]["attn_z"].abs().max()


# --- padded batches -----------------------------------------------------------------------------

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


def string_pairs(lengths: list[int], seed: int = 3) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = [], []
    for n in lengths:
        a = torch.randint(0, len(WORDS), (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, len(WORDS), (n,), generator=g), a)
        clean.append(" ".join(WORDS[i] for i in a))
        corrupt.append(" ".join(WORDS[i] for i in b))
    return clean, corrupt


@pytest.mark.parametrize("variant", ["ln_gelu", "gqa", "softcap"])
def test_padded_batch_equals_pairs_alone(variant: str) -> None:
    """Left-padded pairs of different lengths: each pair contributes exactly what the naive
    reference gives for it alone, unpadded (positions aligned on the last token); a position is
    averaged over the pairs in which it is real (pad positions have no nodes)."""
    model = tokenized_model(variant)
    lengths = [4, 6, 3, 5, 2]  # in batches of 2: the longest pair is in the first batch only
    clean, corrupt = string_pairs(lengths)
    answers, wrongs = torch.tensor([5, 9, 30, 1, 44]), torch.tensor([7, 2, 11, 40, 3])
    width = max(lengths)
    types = node_types(model)
    alone = [reference(model, model.to_tokens(c, prepend_bos=False), model.to_tokens(n, prepend_bos=False),
                       metrics.logit_diff(answers[i:i + 1], wrongs[i:i + 1]))
             for i, (c, n) in enumerate(zip(clean, corrupt))]
    count = torch.zeros(width, dtype=torch.float64)
    for n in lengths:
        count[width - n:] += 1
    for method in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            padded = attribute(model, clean, corrupt, metrics.logit_diff(answers, wrongs), nodes=types, method=method,
                               batch_size=2)
        assert padded.alignment.startswith("left-padded")
        assert padded.pairs.tolist() == count.tolist()  # the longest pair is real at every position
        for nt in types:
            for kind, got in (("scores", padded.scores[nt]), ("signed", padded.signed[nt])):
                if kind == "signed" and method in ("atp+gd", "atp*"):
                    continue
                total = torch.zeros_like(got)
                for ref, n in zip(alone, lengths):
                    total[:, width - n:] += ref[method][0 if kind == "scores" else 1][nt]
                expected = total / count.reshape((1, width) + (1,) * (got.ndim - 2))
                assert_matches(got, expected, f"{method} padded {kind} of {nt}")
