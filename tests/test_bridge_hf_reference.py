"""The TransformerBridge against references written with plain PyTorch hooks on the Hugging Face
model it wraps: no HookedTransformer and no SAE-Lens, so these run under TransformerLens 3 and 4.

Head outputs (``attn_z``) are the input of GPT-2's ``attn.c_proj`` split into heads; neurons
(``mlp_neurons``) the input of ``mlp.c_proj``. Compatibility mode folds LayerNorms and value biases
and centres the unembedding: none of that changes a logit difference or a difference of z values,
so exact effects and AtP estimates are those of the Hugging Face model, up to the rounding of that
weight processing (differences about 1e-9 on effects of 1e-3 to 1, in float64).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from atp_plugin import attribute
from helpers import bridge_pairs
from hf_models import load_bridge, save_gpt2

N_HEADS, D_HEAD = 4, 8
SITES = {"attn_z": "attn.c_proj", "mlp_neurons": "mlp.c_proj"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = save_gpt2(tmp_path_factory.mktemp("gpt2"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return hf, load_bridge(path)


def c_proj_inputs(hf, tokens: torch.Tensor, node_type: str, grad_of=None, patch=None):
    """The inputs of every layer's ``node_type`` projection ``[batch, pos, width]`` on ``tokens``,
    with ``patch(layer, x) -> x`` applied first; with ``grad_of(logits) -> [batch]``, also the
    gradient of its sum at each."""
    acts, handles = {}, []
    for layer, block in enumerate(hf.transformer.h):
        module = block.get_submodule(SITES[node_type])

        def pre(mod, args, layer=layer):
            x = args[0] if patch is None else patch(layer, args[0])
            if grad_of is not None:
                x.retain_grad()
            acts[layer] = x
            return (x,)
        handles.append(module.register_forward_pre_hook(pre))
    try:
        with torch.set_grad_enabled(grad_of is not None):
            logits = hf(tokens).logits
            if grad_of is not None:
                grad_of(logits).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return logits, acts


def nodes_of(node_type: str, width: int) -> tuple[int, int]:
    """(nodes per position, values per node) of a projection input of ``width``."""
    return (N_HEADS, D_HEAD) if node_type == "attn_z" else (width, 1)


@pytest.mark.parametrize("node_type", sorted(SITES))
def test_exact_patching_equals_hand_patched_hf_runs(models, node_type):
    hf, bridge = models
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    idx = torch.arange(len(clean))
    _, noise = c_proj_inputs(hf, corrupt, node_type)
    base = metric(c_proj_inputs(hf, clean, node_type)[0], idx)
    per, size = nodes_of(node_type, noise[0].shape[-1])
    n_layers, t = len(hf.transformer.h), clean.shape[1]
    expected = torch.zeros(n_layers, t, per, dtype=torch.float64)
    nodes = [(ly, p, i) for ly in range(n_layers) for p in range(t) for i in range(per)]
    if node_type == "mlp_neurons":
        nodes = nodes[:: 37]  # a spread of neurons: every one would be 1,280 runs
    for ly, p, i in nodes:
        def patch(layer, x, ly=ly, p=p, i=i):
            if layer != ly:
                return x
            x = x.clone()
            x[:, p, i * size:(i + 1) * size] = noise[ly][:, p, i * size:(i + 1) * size]
            return x
        expected[ly, p, i] = (metric(c_proj_inputs(hf, clean, node_type, patch=patch)[0], idx) - base).mean()
    got = attribute(bridge, clean, corrupt, metric, nodes=node_type, method="ap").signed[node_type]
    for ly, p, i in nodes:
        torch.testing.assert_close(got[ly, p, i], expected[ly, p, i], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("node_type", sorted(SITES))
def test_atp_equals_the_hf_gradient_dot_product(models, node_type):
    hf, bridge = models
    clean, corrupt, metric = bridge_pairs(n=3, t=6)
    idx = torch.arange(len(clean))
    _, noise = c_proj_inputs(hf, corrupt, node_type)
    _, acts = c_proj_inputs(hf, clean, node_type, grad_of=lambda logits: metric(logits, idx))
    per, size = nodes_of(node_type, noise[0].shape[-1])
    expected_signed, expected_abs = [], []
    for layer in sorted(acts):
        delta = (noise[layer] - acts[layer].detach()).unflatten(-1, (per, size))  # [batch, pos, node, feat]
        est = (delta * acts[layer].grad.unflatten(-1, (per, size))).sum(-1)      # [batch, pos, node]
        expected_signed.append(est.mean(0))
        expected_abs.append(est.abs().mean(0))
    result = attribute(bridge, clean, corrupt, metric, nodes=node_type, method="atp")
    torch.testing.assert_close(result.signed[node_type], torch.stack(expected_signed), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(result.scores[node_type], torch.stack(expected_abs), rtol=1e-5, atol=1e-8)
