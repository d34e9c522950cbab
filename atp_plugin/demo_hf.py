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

import torch

from .demo_task import demo_gpt2


def save_demo_as_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the demo model and its tokenizer to ``path`` as a Hugging Face GPT-2 directory (without
    the unembedding bias, which GPT-2 checkpoints cannot hold)."""
    hf, tokenizer = demo_gpt2(dtype)
    path = Path(path)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the bundled demo model as a Hugging Face GPT-2 directory.")
    parser.add_argument("path", help="directory to write (created)")
    path = save_demo_as_hf(parser.parse_args().path)
    print(f"wrote {path}/ (GPT-2 architecture, with its tokenizer); try: atp rank --model {path} ...")


if __name__ == "__main__":
    main()
