"""Every architecture family of ``hf_models.FAMILIES`` as a float64 TransformerBridge: the QK fix's
query and key scores equal an independent reference (patch one ``hook_q``/``hook_k`` node, read the
model's own ``hook_pattern``, dot its change with dL/dpattern), or the model is refused with an
``AtpError`` before any run: never a silently wrong number. And the whole matrix, family x method
(node atp, atp+qk, atp*, ig, ap; edge atp, atp+qk, ig, ap; SAE features: node atp, edge atp, ap),
each against its naive reference (``arch_reference``) or refused with an ``AtpError`` naming the
feature; README's table of architectures is ``scripts/architecture_table.py``'s print of the same
cells.

The reference carries the model's own rounding: Hugging Face runs rotary embeddings and the
attention softmax in float32 even in a float64 model, so patterns agree to about 1e-7, not 1e-15.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from arch_reference import EDGE_METHODS, NODE_METHODS, check
from atp_plugin import attribute, metrics
from atp_plugin.attribution import host_for
from atp_plugin.errors import AtpError
from helpers import bridge_pairs, reference
from hf_models import D_VOCAB, FAMILIES, load_bridge, load_hooked, save_family

QK = ["attn_q", "attn_k"]
#: families whose q/k the QK fix cannot follow yet, and the words their refusal names
REFUSED = {"olmo2": "norm over all heads"}
#: families whose Bridge forms the scores and the softmax in float64 (fused-qkv rotary attention,
#: rotated by the host from the model's own cos and sin): held to float64 rounding (measured 4e-15)
EXACT = {"gpt_neox", "phi3"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_bridge(save_family(request.param, tmp_path_factory.mktemp(request.param)))
    try:
        with torch.no_grad():
            model(torch.tensor([[2, 3, 4]]))
    except RuntimeError as err:  # TransformerLens 3.9's Bridge runs Qwen 2 in float32 inside a float64 model
        pytest.skip(f"this TransformerLens's Bridge cannot run {request.param} in float64: {err}")
    return request.param, model


@pytest.mark.parametrize("method", ["atp+qk", "atp*"])
def test_qk_fix_follows_the_model_or_refuses(family, method):
    name, model = family
    clean, corrupt, metric = bridge_pairs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-layers GradDrop warning
        if name in REFUSED:
            with pytest.raises(AtpError, match=REFUSED[name]):
                attribute(model, clean, corrupt, metric, nodes=QK, method=method, progress=False)
            return
        got = attribute(model, clean, corrupt, metric, nodes=QK, method=method, progress=False)
    expected = reference(model, clean, corrupt, metric)
    for nt in QK:
        want, first_order = expected[method][0][nt], expected["atp" if method == "atp+qk" else "atp+gd"][0][nt]
        scale = float(want.abs().max())
        assert float((want - first_order).abs().max()) > 1e-3 * scale, f"{name}: attention too uniform to test the fix"
        tol = 1e-12 if name in EXACT else 1e-5
        torch.testing.assert_close(got.scores[nt], want, rtol=0, atol=tol * scale, msg=f"{name} {nt}")


def test_fused_qkv_rotary_is_rotated_by_the_host(family):
    """GPT-NeoX (partial rotary) and Phi-3 (fused qkv) Bridges fire no hook_rot_q/hook_rot_k: the
    host reads hook_q/hook_k and rotates them with the model's own cos and sin."""
    name, model = family
    if name in REFUSED:
        pytest.skip(f"the QK fix refuses {name}")
    geom = host_for(model).attention(1)
    if name in EXACT:
        assert (geom.q_hook, geom.k_hook) == ("blocks.1.attn.hook_q", "blocks.1.attn.hook_k")
        assert geom.rotation is not None and geom.rotation.reads == ("blocks.1.attn.hook_cos", "blocks.1.attn.hook_sin")
    else:
        assert geom.rotation is None


@pytest.mark.parametrize("method", ["atp+qk", "atp*"])
def test_left_padded_pairs_equal_pairs_alone(family, method):
    """Left-padded string pairs of different lengths: each pair contributes what the pattern
    reference gives for it alone, unpadded (positions aligned on the last token)."""
    name, model = family
    if name in REFUSED:
        pytest.skip(f"the QK fix refuses {name}")
    host = host_for(model)
    if len(host.tokenize("w1 w2")) <= len(host.tokenize("")):  # TransformerLens 4.3's Qwen 2 Bridge
        pytest.skip(f"the {name} Bridge's tokenizer drops the test's words")
    lengths, answers, wrongs = [3, 5, 4], torch.tensor([5, 9, 30]), torch.tensor([7, 2, 11])
    g = torch.Generator().manual_seed(2)
    clean = [" ".join(f"w{int(i)}" for i in torch.randint(0, D_VOCAB - 2, (n,), generator=g)) for n in lengths]
    corrupt = [" ".join(f"w{(int(w[1:]) + 7 * (j % 2)) % (D_VOCAB - 2)}" for j, w in enumerate(c.split()))
               for c in clean]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = attribute(model, clean, corrupt, metrics.logit_diff(answers, wrongs), nodes=QK, method=method,
                           progress=False)
        alone = [reference(model, torch.tensor([host.tokenize(c)]), torch.tensor([host.tokenize(n)]),
                           metrics.logit_diff(answers[i:i + 1], wrongs[i:i + 1]))[method][0]
                 for i, (c, n) in enumerate(zip(clean, corrupt))]
    assert padded.alignment.startswith("left-padded")
    width = padded.scores["attn_q"].shape[1]
    count = padded.pair_counts.to(torch.float64)
    for nt in QK:
        total = torch.zeros_like(padded.scores[nt])
        for ref in alone:
            total[:, width - ref[nt].shape[1]:] += ref[nt]
        expected = total / count.reshape(1, width, 1)
        scale = float(expected.abs().max())
        tol = 1e-12 if name in EXACT else 1e-5
        torch.testing.assert_close(padded.scores[nt], expected, rtol=0, atol=tol * scale, msg=f"{name} {nt}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hooked_transformer_qk_fix_is_exact(name, tmp_path):
    """TransformerLens 3's own implementation of each family it supports, in float64 throughout."""
    from atp_plugin.hosts.hooked import hooked_transformer_class
    if hooked_transformer_class() is None:
        pytest.skip("HookedTransformer needs TransformerLens 3")
    try:
        model = load_hooked(save_family(name, tmp_path))
    except NotImplementedError as err:
        pytest.skip(f"TransformerLens 3's HookedTransformer does not support {name}: {err}")
    clean, corrupt, metric = bridge_pairs()
    same_scores(attribute(model, clean, corrupt, metric, nodes=QK, method="atp+qk", progress=False),
                reference(model, clean, corrupt, metric)["atp+qk"][0])


def test_plain_atp_is_exact_on_every_family(family):
    name, model = family
    clean, corrupt, metric = bridge_pairs()
    same_scores(attribute(model, clean, corrupt, metric, nodes=QK, method="atp", progress=False),
                reference(model, clean, corrupt, metric)["atp"][0])


def same_scores(got, expected: dict[str, torch.Tensor]) -> None:
    """The result's q and k scores equal the reference's in float64."""
    for nt in QK:
        scale = float(expected[nt].abs().max())
        torch.testing.assert_close(got.scores[nt], expected[nt], rtol=1e-9, atol=1e-12 * scale, msg=nt)


ROTARY = {"gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"}
#: families with a q/k norm between the projection and the scores (per head, or over all heads)
QK_NORM = {"qwen3", "gemma3", "olmo2"}


def refusal(name: str, kind: str, method: str, model) -> str | None:
    """The words the library's refusal of ``method`` on ``name`` names (a regex), or None where it
    serves it. TransformerLens 3.9's OLMo 2 Bridge names its post-norms ln1/ln2 (no ln1_post), so
    there the structure check on the first batch refuses its edges (after the QK fix's own check)."""
    if kind == "edge" and method == "atp+qk" and name in QK_NORM:  # refused before any run
        return "q/k norm"
    if kind in ("edge", "sae edge") and name == "olmo2" and not hasattr(model.blocks[0], "ln1_post"):
        return "not what the edge engine recomputes"
    if method in ("atp+qk", "atp*") and name in REFUSED:
        return REFUSED[name]
    return None


#: families whose Hugging Face RMSNorm computes in float32 inside a float64 model
FLOAT32_NORM = set(FAMILIES) - {"gpt2", "gpt_neox"}


@pytest.mark.parametrize("kind,method", [("node", m) for m in NODE_METHODS] + [("edge", m) for m in EDGE_METHODS]
                         + [("sae node", "atp"), ("sae edge", "atp"), ("sae edge", "ap")])
def test_every_method_equals_its_reference_or_is_refused(family, kind, method):
    """Node atp/atp+qk/atp*/ig/ap on attn_q/attn_k, edge atp/atp+qk/ig/ap, node atp on an SAE's
    features and edge atp/ap with its features in the graph, against the hook-only references of
    ``arch_reference`` (exact patching, autograd along the change or the path, the model's own
    pattern), or refused with an AtpError naming the feature, never another exception. Float64
    throughout: measured 4e-14 at most, but 2e-6 for the QK fix (node and edge) on the Bridges whose
    Hugging Face attention takes its rotary and softmax in float32 (docstring above), and 1e-7 for
    feature edges where the reads of features at an MLP go back through its float32 RMSNorm."""
    name, model = family
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    got = check(model, kind, method, clean, corrupt, metric)
    words = refusal(name, kind, method, model)
    if words is not None:
        assert isinstance(got, str) and re.search(words, got), f"{name} {kind} {method}: {got}"
        return
    assert not isinstance(got, str), f"{name} {kind} {method} refused: {got}"
    float32_softmax = method in ("atp+qk", "atp*") and name in ROTARY - EXACT
    float32_norm = kind == "sae edge" and name in FLOAT32_NORM
    assert got <= (1e-5 if float32_softmax else 1e-6 if float32_norm else 1e-11), \
        f"{name} {kind} {method}: relative error {got:.2g}"
