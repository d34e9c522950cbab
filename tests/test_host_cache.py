"""The Bridge host's probes, kept per model between calls: reused while the model is unchanged,
learned again when its dtype, its hooks or its hook gates change, and never keeping a model alive;
a run's hooks on one hook point compose as separate ``run_with_hooks`` entries would. No
HookedTransformer and no SAE-Lens: these run under TransformerLens 3 and 4."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from atp_plugin import attribute
from atp_plugin.attribution import host_for
from atp_plugin.errors import UnsupportedModelError
from atp_plugin.hosts import bridge as bridge_host
from helpers import bridge_pairs
from hf_models import save_gpt2

NODES = ["attn_q", "attn_k", "attn_z", "mlp_neurons"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


def load(path, dtype: torch.dtype = torch.float64) -> TransformerBridge:
    """A fresh Bridge (compatibility mode) of the saved model in ``dtype``: nothing probed yet."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


def rank(model, method: str = "atp+qk"):
    clean, corrupt, metric = bridge_pairs()
    return attribute(model, clean, corrupt, metric, nodes=NODES, method=method, progress=False)


def assert_same(a, b, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.scores.keys() == b.scores.keys()
    for key in a.scores:
        assert a.scores[key].dtype == b.scores[key].dtype, key
        torch.testing.assert_close(a.scores[key], b.scores[key], rtol=rtol, atol=atol, msg=key)
        torch.testing.assert_close(a.signed[key], b.signed[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)


@pytest.fixture
def probe_runs(monkeypatch) -> list[int]:
    """Counts the host's probe runs (each builds the probe prompt once)."""
    runs: list[int] = []
    make = bridge_host.TransformerBridgeHost._probe_tokens

    def counted(self, *args, **kwargs):
        runs.append(1)
        return make(self, *args, **kwargs)

    monkeypatch.setattr(bridge_host.TransformerBridgeHost, "_probe_tokens", counted)
    return runs


def test_a_second_call_probes_nothing_and_gives_the_same_numbers(gpt2_dir, probe_runs):
    model = load(gpt2_dir)
    first = rank(model)
    assert len(probe_runs) >= 2  # the scales of all layers, then the check of the hooks the runs use
    probe_runs.clear()
    again = rank(model)
    assert probe_runs == []
    assert_same(again, first)
    assert_same(again, rank(load(gpt2_dir)))  # a fresh model probed afresh


def test_a_dtype_change_is_probed_again(gpt2_dir, probe_runs):
    """The attention scale measured in float32 is exact only to float32 rounding; after
    ``model.to(float64)`` it is measured again, so the QK fix matches a model that was float64
    before its first call (same float32-rounded weights)."""
    model = load(gpt2_dir, torch.float32)
    assert rank(model).scores["attn_q"].dtype == torch.float32
    model.to(torch.float64)
    probe_runs.clear()
    widened = rank(model)
    assert probe_runs != []
    fresh = load(gpt2_dir, torch.float32).to(torch.float64)
    assert_same(widened, rank(fresh), rtol=1e-12, atol=1e-15)


def test_a_hook_added_later_is_checked_again(gpt2_dir):
    """A permanent hook that detaches layer 0's attention output cuts ``hook_z`` of layer 0 off the
    logits: the call refuses instead of reusing the earlier check and returning zeros; once the hook
    is removed the numbers are those of the first call."""
    model = load(gpt2_dir)
    first = rank(model, "atp")
    model.add_hook("blocks.0.hook_attn_out", lambda x, hook: x.detach(), is_permanent=True)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn\.hook_z"):
        rank(model, "atp")
    model.reset_hooks(including_permanent=True)
    assert_same(rank(model, "atp"), first)


def test_a_hook_gate_switched_off_later_is_refused(gpt2_dir):
    """``hook_attn_in`` fires only while ``use_attn_in`` is on; switched off after a call, the bridge
    refuses the hook again instead of the host reusing the earlier check (it would never fire)."""
    model = load(gpt2_dir)
    model.set_use_attn_in(True)
    host = host_for(model)
    tokens = torch.tensor([[2, 3, 4]])
    seen: list[torch.Tensor] = []
    host.run(tokens, None, [("blocks.0.hook_attn_in", lambda x, hook: seen.append(x))])
    assert len(seen) == 1
    model.set_use_attn_in(False)
    with pytest.raises(ValueError, match="use_attn_in"):
        host_for(model).run(tokens, None, [("blocks.0.hook_attn_in", lambda x, hook: seen.append(x))])


def test_hooks_on_one_point_compose_in_order(gpt2_dir):
    """Two names of one hook point (an alias and its target) with hooks 2x then x+1, and a hook that
    returns None (keeps the value): the logits of one run_with_hooks hook doing 2x+1."""
    model = load(gpt2_dir)
    tokens = torch.tensor([[2, 3, 4, 5]])
    seen: list[torch.Tensor] = []
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: 2 * x), ("blocks.0.hook_in", lambda x, hook: x + 1),
             ("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x))]
    logits = host_for(model).run(tokens, None, hooks)
    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: 2 * x + 1)])
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    plain = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x))])
    torch.testing.assert_close(seen[0], 2 * seen[1] + 1, rtol=0, atol=0)
    assert not torch.equal(logits, plain)


def test_the_kept_probes_do_not_keep_the_model_alive(gpt2_dir):
    model = load(gpt2_dir)
    result = rank(model)
    ref = weakref.ref(model)
    del model, result
    gc.collect()
    assert ref() is None
