"""Small float64 TransformerLens models with random weights, built fresh for tests.

The suite runs under TransformerLens 3 (with SAE-Lens) and 4 (no ``HookedTransformer``, no
SAE-Lens): a module that needs either starts with ``requires_hooked()`` / ``requires_sae()``,
which skip it, with the reason, where the package is absent, and only there.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

torch.set_num_threads(2)


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


HAS_HOOKED = _has_hooked()
HAS_SAE = importlib.util.find_spec("sae_lens") is not None


MISSING = {
    "hooked": None if HAS_HOOKED else
    "needs HookedTransformer, which TransformerLens 4 removed (pip install 'transformer-lens<4')",
    "sae": None if HAS_SAE and HAS_HOOKED else "needs SAE-Lens and TransformerLens 3 (pip install 'atp-plugin[sae]')",
}
#: test modules that need HookedTransformer or SAE-Lens (at import or in every test); they are
#: skipped, with the reason, where it is missing, and only there
NEEDS = {
    **dict.fromkeys(["test_sae.py", "test_transcoder.py", "test_demo_sae.py", "test_bridge.py"], "sae"),
    **dict.fromkeys(["test_demo_hf.py", "test_saturation.py"], "hooked"),
}
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason=MISSING["hooked"] or "")


def needs_hooked_for(why: str) -> pytest.MarkDecorator:
    """Skip where HookedTransformer is missing, saying what of it the test needs."""
    return pytest.mark.skipif(not HAS_HOOKED, reason=f"{why}: {MISSING['hooked']}")


#: the planted additive setting (``make_additive_model``): no LayerNorm, attention only
needs_additive = needs_hooked_for("a model without LayerNorm, where effects add exactly (make_additive_model)")
#: the hosts a test parametrized over ``host`` runs on: HookedTransformer where TransformerLens has it,
#: and always a TransformerBridge
HOSTS = ("hooked", "bridge") if HAS_HOOKED else ("bridge",)


class _SkippedModule(pytest.Module):
    """A test module whose requirement is missing: reported as skipped with the reason, not imported."""

    reason = ""

    def collect(self):
        pytest.skip(f"{self.path.name}: {self.reason}")


def pytest_pycollect_makemodule(module_path, parent):
    reason = MISSING.get(NEEDS.get(module_path.name, ""))
    if reason:
        module = _SkippedModule.from_parent(parent, path=module_path)
        module.reason = reason
        return module
    return None


VARIANTS = {
    "ln_gelu": dict(n_layers=3, normalization_type="LN", act_fn="gelu"),
    "rms_rotary_gated": dict(n_layers=3, normalization_type="RMS", act_fn="silu", gated_mlp=True,
                             positional_embedding_type="rotary", rotary_dim=8),
    "gqa": dict(n_layers=3, normalization_type="RMS", act_fn="silu", gated_mlp=True, n_key_value_heads=2,
                positional_embedding_type="rotary", rotary_dim=8),
    "parallel": dict(n_layers=3, normalization_type="LN", act_fn="gelu", parallel_attn_mlp=True),
    "attn_only": dict(n_layers=2, attn_only=True, normalization_type="LN"),
    "softcap": dict(n_layers=2, normalization_type="LN", act_fn="gelu", attn_scores_soft_cap=5.0),
}


def make_model(seed: int = 0, *, d_model: int = 32, n_heads: int = 4, d_head: int = 8, d_mlp: int = 64,
               d_vocab: int = 50, n_ctx: int = 16, **overrides) -> HookedTransformer:
    """A random float64 HookedTransformer (weights scaled so attention is not uniform)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, d_vocab=d_vocab,
               n_ctx=n_ctx, act_fn="gelu", normalization_type="LN", dtype=torch.float64, seed=seed,
               default_prepend_bos=False)
    cfg.update(overrides)
    if cfg.get("attn_only"):
        cfg.pop("d_mlp")
        cfg.pop("act_fn")
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K")):
                p.mul_(3.0)
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")):
                p.normal_(0, 0.1)
    return model.eval()


_SAVED: dict[tuple, Path] = {}


def make_bridge(seed: int = 0, n_layers: int = 2, *, prepend_bos: bool = False, llama: bool = False,
                **overrides) -> TransformerBridge:
    """A random float64 GPT-2 (``hf_models.save_gpt2``: d_model 32, 4 heads of 8, d_mlp 128,
    vocabulary 50, whose tokenizer reads "wI" as token I + 2) as a TransformerBridge in
    compatibility mode; with ``llama``, ``hf_models.save_llama``'s 2-layer Llama (rotary, 2
    kv-heads). Without ``prepend_bos`` it adds no BOS, like ``make_model``'s models. Each Hugging
    Face model is saved once per session, and loaded afresh (0.2 s) on each call."""
    from hf_models import load_bridge, save_gpt2, save_llama

    key = (seed, n_layers, llama, tuple(sorted(overrides.items())))
    if key not in _SAVED:
        root = Path(tempfile.mkdtemp(prefix="atp-hf-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        if llama:
            assert n_layers == 2, "save_llama's model has 2 layers"
            _SAVED[key] = save_llama(root, seed=seed, **overrides)
        else:
            _SAVED[key] = save_gpt2(root, seed=seed, n_layer=n_layers, **overrides)
    model = load_bridge(_SAVED[key])
    model.cfg.default_prepend_bos = prepend_bos
    return model


def host_model(host: str, seed: int = 0, n_layers: int = 2):
    """A small random float64 model on ``host`` (``"hooked"``: ``make_model``; ``"bridge"``: ``make_bridge``)."""
    return make_model(seed, n_layers=n_layers) if host == "hooked" else make_bridge(seed, n_layers)


@pytest.fixture(params=HOSTS)
def host(request) -> str:
    return request.param


def make_pairs(n: int = 4, t: int = 6, d_vocab: int = 50, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token pairs [n, t]; corrupt differs from clean at a few positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, t), generator=g)
    corrupt = clean.clone()
    change = torch.rand(n, t, generator=g) < 0.5
    corrupt[change] = torch.randint(0, d_vocab, (int(change.sum()),), generator=g)
    return clean, corrupt


def make_additive_model(seed: int = 3, *, planted_head: int | None = None, scale: float = 20.0) -> HookedTransformer:
    """A 1-layer attention-only float64 model without LayerNorm: the metric is linear in every
    value vector and attention patterns do not depend on values, so the effects of attn_v nodes
    patched jointly add up exactly. ``planted_head``'s W_O is scaled by ``scale``."""
    model = make_model(seed, n_layers=1, attn_only=True, normalization_type=None)
    if planted_head is not None:
        with torch.no_grad():
            model.blocks[0].attn.W_O[planted_head] *= scale
    return model


def make_planted_pairs(n: int = 3, t: int = 6, positions: tuple[int, ...] = (1, 3), d_vocab: int = 50,
                       seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token pairs [n, t] whose corrupt prompt differs from the clean one exactly at ``positions``."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, t), generator=g)
    corrupt = clean.clone()
    shift = torch.randint(1, d_vocab, (n, len(positions)), generator=g)
    corrupt[:, list(positions)] = (clean[:, list(positions)] + shift) % d_vocab
    return clean, corrupt


def clean_gradients(model: HookedTransformer, clean: torch.Tensor, metric, hooks: list[str]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Hook name -> (its value on the clean run, d(summed metric)/d(value)), ``[N, T, ...]`` each,
    from one plain TransformerLens run with ``retain_grad``: the references' gradient, written
    without the library."""
    acts = {}

    def keep(name: str):  # by the name asked for: on a Bridge, hook.name is that of the point it aliases
        def hook(x: torch.Tensor, hook) -> torch.Tensor:
            x.retain_grad()
            acts[name] = x
            return x
        return hook

    model.zero_grad()
    logits = model.run_with_hooks(clean, fwd_hooks=[(h, keep(h)) for h in hooks])
    metric(logits, torch.arange(len(clean))).sum().backward()
    return {h: (x.detach(), x.grad) for h, x in acts.items()}


def usage_error(capsys, argv: list) -> str:
    """Run ``atp *argv``, which must fail as a bad argument: exit code 2 and one stderr line
    ``atp <command>: error: ...``, returned."""
    from atp_plugin import cli

    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"atp {argv[0]}: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def logit_diff_metric(n: int, d_vocab: int = 50, seed: int = 2):
    from atp_plugin import metrics
    g = torch.Generator().manual_seed(seed)
    answer = torch.randint(0, d_vocab, (n,), generator=g)
    return metrics.logit_diff(answer, torch.randint(0, d_vocab, (n,), generator=g))


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param
