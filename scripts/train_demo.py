"""Train the IOI demo model shipped in ``atp_plugin/data`` and print its held-out scores.

Usage: python scripts/train_demo.py [--out atp_plugin/data] [--steps N] [--seed S] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # train this checkout's code, installed or not

from atp_plugin.demo_task import evaluate_demo_model, train_demo_model  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "atp_plugin" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the weights, config and tokenizer")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared 2-core box, two OpenMP threads competing
    # with other processes ran ~10x slower per step than one.  Results are
    # reproducible for a fixed thread count.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train_demo_model(args.out, steps=args.steps, seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.0f}s, saved to {args.out}")
    print(json.dumps(evaluate_demo_model(model), indent=2))


if __name__ == "__main__":
    main()
