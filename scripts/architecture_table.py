"""README's table of architectures: every method on tiny random float64 Hugging Face models of ten
families, booted as TransformerLens Bridges, each against its naive reference.

    OMP_NUM_THREADS=1 python scripts/architecture_table.py

A cell is a check mark where the method runs and equals its reference (``tests/arch_reference.py``:
exact patching with hooks, autograd along the change or the embedding path, the model's own
attention pattern after patching one query or key) to the relative error shown, else the
one-line reason the library refuses it. The models (``tests/hf_models.py``) and the references are
the tests' own (``tests/test_architectures.py`` asserts the same cells); offline, a few minutes on one core.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402

from arch_reference import EDGE_METHODS, NODE_METHODS, check  # noqa: E402
from helpers import bridge_pairs  # noqa: E402
from hf_models import FAMILIES, load_bridge, save_family  # noqa: E402

#: what each family exercises (``hf_models.FAMILIES``)
FEATURES = {
    "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX / Pythia (partial rotary, parallel attention)",
    "llama": "Llama (GQA)", "mistral": "Mistral (sliding window)", "qwen2": "Qwen 2 (qkv bias)",
    "qwen3": "Qwen 3 (per-head q/k norm)", "gemma2": "Gemma 2 (soft-capping, post-norms)",
    "gemma3": "Gemma 3 (q/k norm, post-norms)", "phi3": "Phi-3 (fused qkv)",
    "olmo2": "OLMo 2 (all-head q/k norm, post-norms)",
}


def short(reason: str) -> str:
    """A refusal's gist (its first clause), for the notes under the table."""
    for cut in ("; use", "; node methods", " (ln1_post", ": patching"):
        reason = reason.split(cut)[0]
    return reason.replace("|", "/")


def main() -> None:
    logging.disable(logging.WARNING)
    cols = [("node", m) for m in NODE_METHODS] + [("edge", m) for m in EDGE_METHODS] \
        + [("sae node", "atp"), ("sae edge", "atp"), ("sae edge", "ap")]
    notes: dict[str, int] = {}  # reason -> its number under the table

    def cell(result: float | str) -> str:
        if isinstance(result, float):
            return f"✓ {result:.0e}"
        return f"no [{notes.setdefault(short(result), len(notes) + 1)}]"

    print(f"TransformerLens {version('transformer-lens')}, TransformerBridge in compatibility mode, float64; "
          "✓ with the largest error relative to the reference's largest value\n")
    print("| family | " + " | ".join(f"{k} {m}" for k, m in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    for name in FAMILIES:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            model = load_bridge(save_family(name, Path(tmp) / "model"))
            try:
                with torch.no_grad():
                    model(clean[:1])
            except RuntimeError as err:  # TransformerLens 3.9's Bridge runs Qwen 2 in float32 inside float64
                cells = [cell(f"the Bridge cannot run it in float64 ({str(err).splitlines()[0][:60]})")] * len(cols)
            else:
                cells = [cell(check(model, kind, method, clean, corrupt, metric)) for kind, method in cols]
        print(f"| {FEATURES[name]} | " + " | ".join(cells) + " |", flush=True)
    print()
    for reason, n in notes.items():
        print(f"[{n}] {reason}  ")


if __name__ == "__main__":
    main()
