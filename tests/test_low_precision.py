"""Models in bfloat16 and float16: ``attribute()`` runs them in their dtype and
returns float32 scores, close to the float32 model's.

- Against the float32 model (same weights before the cast): relative L2 error of all scores below
  ``ERROR_BOUND``, about twice the worst measured (2026-12-03, seeds 0-3 of each model, atp,
  atp+qk and atp* (the Bridge: atp, below): bfloat16 0.020-0.070, float16 0.0026-0.0076), and
  top-20 overlap at least ``MIN_OVERLAP`` (worst measured 0.90). The error must also be above
  zero: the cast took effect.
- Scores are accumulated over pairs in float32: 16 copies of one pair run one at a time (each
  copy's estimate bitwise the same; 32 on the Bridge) give the one pair's scores and signed means
  (atp; atp*'s GradDrop scores) to float32 rounding, where a
  bfloat16 running sum of 16 equal values is off by 0.6% (median; measured) and a float16 sum
  of these magnitudes overflows to inf.

HookedTransformer where TransformerLens 3 is installed; a TransformerBridge booted offline from a
saved random GPT-2 (``hf_models``) under either TransformerLens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from atp_plugin import attribute
from atp_plugin.result import AttributionResult
from conftest import logit_diff_metric, make_model, make_pairs, needs_hooked
from hf_models import save_gpt2

# 3-layer models: atp* warns that GradDrop degenerates with few layers, as it should; not the subject here
pytestmark = pytest.mark.filterwarnings("ignore:.*GradDrop degenerates with few layers:UserWarning")

NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons"]
METHODS = ("atp", "atp+qk", "atp*")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ERROR_BOUND = {torch.bfloat16: 0.14, torch.float16: 0.015}
TOP_K, MIN_OVERLAP = 20, 0.8
N_PAIRS, N_TOKENS, COPIES, METRIC_SCALE = 8, 12, 16, 8192.0
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def hooked(dtype: torch.dtype) -> Any:
    """3 layers, d_model 64, 4 heads, float32 weights (W_Q, W_K scaled up) cast to ``dtype``."""
    model = make_model(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=256, dtype=torch.float32)
    return model.to(dtype)


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=3, qk_gain=4.0)


def bridge(path: Path, dtype: torch.dtype) -> TransformerBridge:
    """The saved GPT-2 as a TransformerBridge in ``dtype`` (compatibility mode), offline."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Token pairs valid for both models (ids 2.. are words in hf_models' vocabulary)."""
    clean, corrupt = make_pairs(N_PAIRS, N_TOKENS)
    return clean.clamp(min=2), corrupt.clamp(min=2)


def flat_scores(result: AttributionResult) -> torch.Tensor:
    """Every score of the result in one vector, after checking that scores and signed means are
    float32 and finite (GradDrop's signed means are NaN throughout: it has none)."""
    for kind, tensors in (("scores", result.scores), ("signed", result.signed)):
        for key, s in tensors.items():
            assert s.dtype == torch.float32, f"{kind}[{key}]: {s.dtype}"
            graddrop_signed = kind == "signed" and result.method == "atp*" and bool(s.isnan().all())
            assert graddrop_signed or torch.isfinite(s).all(), f"{kind}[{key}]: non-finite values"
    return torch.cat([result.scores[k].flatten() for k in sorted(result.scores)])


def compare(build: Callable[[torch.dtype], Any], dtype: torch.dtype, method: str) -> None:
    """The ``dtype`` model's scores against the float32 model's: error and top-k overlap bounds."""
    clean, corrupt = pairs()
    metric = logit_diff_metric(N_PAIRS)
    reference = flat_scores(attribute(build(torch.float32), clean, corrupt, metric, nodes=NODES, method=method))
    model = build(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    low = flat_scores(attribute(model, clean, corrupt, metric, nodes=NODES, method=method))
    error = float(torch.linalg.vector_norm(low - reference) / torch.linalg.vector_norm(reference))
    assert 0 < error < ERROR_BOUND[dtype], error
    top = set(low.topk(TOP_K).indices.tolist()) & set(reference.topk(TOP_K).indices.tolist())
    assert len(top) / TOP_K >= MIN_OVERLAP, sorted(top)


@needs_hooked
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_hooked_transformer_close_to_float32(dtype: torch.dtype, method: str) -> None:
    compare(hooked, dtype, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_bridge_close_to_float32(gpt2_path: Path, dtype: torch.dtype, method: str) -> None:
    compare(lambda d: bridge(gpt2_path, d), dtype, method)


def scaled_logit_diff(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``METRIC_SCALE`` x (logit of token 5 - logit of token 7) at the last position, every pair
    alike: scores large enough that a float16 sum over ``COPIES`` pairs overflows."""
    return METRIC_SCALE * (logits[:, -1, 5] - logits[:, -1, 7])


@pytest.mark.parametrize("method", ["atp", "atp*"])  # atp+qk accumulates as atp does
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_scores_accumulate_in_float32(host: str, gpt2_path: Path, dtype: torch.dtype, method: str) -> None:
    model = hooked(dtype) if host == "hooked" else bridge(gpt2_path, dtype)
    n_copies = COPIES if host == "hooked" else 2 * COPIES  # the GPT-2's atp* scores are smaller
    clean, corrupt = (x[:1] for x in pairs())
    single = attribute(model, clean, corrupt, scaled_logit_diff, nodes=NODES, method=method)
    copies = attribute(model, clean.repeat(n_copies, 1), corrupt.repeat(n_copies, 1), scaled_logit_diff, nodes=NODES,
                       method=method, batch_size=1)
    largest = float(flat_scores(single).max())
    if dtype == torch.float16:  # the claim is testable: a float16 accumulator would overflow
        assert n_copies * largest > FLOAT16_MAX, largest
    flat_scores(copies)  # float32, finite
    for key, want in single.scores.items():
        torch.testing.assert_close(copies.scores[key], want, rtol=1e-5, atol=1e-6 * largest)
        torch.testing.assert_close(copies.signed[key], single.signed[key], rtol=1e-5, atol=1e-6 * largest,
                                   equal_nan=True)
