"""Train the SAE shipped in ``atp_plugin/data/sae`` with SAE-Lens's own training runner.

The SAE reads ``blocks.2.hook_resid_pre`` of the bundled IOI demo model: the residual stream after
layers 0 and 1, which carries what the demo's top heads write (layer-0 heads at the repeated name,
layer-1 heads at the last token) into the layers that move the name to the output. It is a top-k SAE
(k=16, 512 features, float32) trained by ``LanguageModelSAETrainingRunner`` on the already loaded
demo model (``override_model``) and an in-memory dataset of tokenized train-split IOI prompts
(``override_dataset``): nothing is downloaded and nothing is logged to W&B. BOS positions are left
out of training (their residual vector is the same in every prompt, and is equal in clean and
corrupt prompts, so it never carries an effect).

Prints the held-out (test split) explained variance, L0 and dead features of the saved SAE, loaded
back from disk with ``SAE.load_from_disk`` as ``atp_plugin.demo_task.load_demo_sae`` does.

Usage: python scripts/train_demo_sae.py [--out atp_plugin/data/sae] [--seed S] [--threads T]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import (  # noqa: E402
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TopKTrainingSAEConfig,
)
from transformer_lens import HookedTransformer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # train this checkout's code, installed or not

from atp_plugin.demo_task import PROMPT_LENGTH, ioi_pairs, load_demo_model  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "atp_plugin" / "data" / "sae"
HOOK = "blocks.2.hook_resid_pre"
CONTEXT = 1 + PROMPT_LENGTH  # BOS + prompt


def prompt_dataset(model: HookedTransformer, n_pairs: int, seed: int) -> Dataset:
    """Tokenized train-split IOI prompts (clean and corrupt of ``n_pairs`` pairs, shuffled), one row
    of ``CONTEXT`` tokens each, BOS included: the ``tokens`` column SAE-Lens takes as pretokenized."""
    pairs = ioi_pairs(n_pairs, seed=seed, split="train")
    tokens = model.to_tokens(pairs.clean + pairs.corrupt)  # [2 * n_pairs, CONTEXT]
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens[torch.randperm(len(tokens), generator=generator)]
    return Dataset.from_dict({"tokens": tokens.tolist()})


def train(model: HookedTransformer, out: Path, *, seed: int, n_pairs: int, k: int, d_sae: int,
          training_tokens: int, lr: float) -> float:
    """Train with SAE-Lens's runner and save the inference SAE to ``out``; returns seconds taken."""
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=d_sae, k=k, dtype="float32", device="cpu",
                                  rescale_acts_by_decoder_norm=False),
        model_name=str(model.cfg.model_name),
        hook_name=HOOK,
        dataset_path="atp_plugin.demo_task.ioi_pairs(split='train')",  # a label: the data is passed in
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=True,  # the tokens carry BOS already; recorded in the SAE's metadata
        exclude_special_tokens=True,  # BOS positions are not trained on
        training_tokens=training_tokens,
        train_batch_size_tokens=1024,
        store_batch_size_prompts=256,
        n_batches_in_buffer=256,  # the mixing buffer holds n_batches_in_buffer * CONTEXT activations
        lr=lr,
        lr_warm_up_steps=50,
        lr_scheduler_name="cosineannealing",
        lr_decay_steps=training_tokens // 1024 - 50,
        dead_feature_window=200,
        feature_sampling_window=500,
        device="cpu",
        seed=seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        model_from_pretrained_kwargs={},  # the model is passed in, not loaded
        verbose=False,
    )
    torch.manual_seed(seed)  # the runner does not seed: SAE init and the mixing buffer's shuffles
    dataset = prompt_dataset(model, n_pairs, seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dataset overrides the config", "fewer samples than tokens"
        trained = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)  # the runner's own final format (training-only fields dropped)
        SAE.load_from_disk(tmp).save_model(out)
    return seconds


@torch.no_grad()
def evaluate(model: HookedTransformer, sae: SAE, n_pairs: int = 2000, seed: int = 1234) -> dict[str, float]:
    """Held-out (test split) reconstruction of the SAE's hook on clean and corrupt prompts, BOS
    positions left out: explained variance 1 - SSE / SST (SST about the mean activation), mean L0,
    and the number of features that fire on no held-out token."""
    pairs = ioi_pairs(n_pairs, seed=seed, split="test")
    _, cache = model.run_with_cache(model.to_tokens(pairs.clean + pairs.corrupt), names_filter=HOOK)
    acts = cache[HOOK][:, 1:].reshape(-1, sae.cfg.d_in)  # [tokens, d_in]
    feats = sae.encode(acts)  # [tokens, d_sae]
    recon = sae.decode(feats)  # [tokens, d_in]
    sse = (acts - recon).pow(2).sum()
    sst = (acts - acts.mean(0)).pow(2).sum()
    return {
        "explained_variance": float(1 - sse / sst),
        "l0": float((feats > 0).sum(-1).float().mean()),
        "dead_features": int(((feats > 0).sum(0) == 0).sum()),
        "tokens": acts.shape[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for cfg.json and the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=10_000, help="train-split pairs (2 prompts each)")
    parser.add_argument("--k", type=int, default=16, help="active features per token (top-k)")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=600_000, help="training tokens (BOS excluded)")
    parser.add_argument("--lr", type=float, default=1e-2)
    # One thread by default, as for the model: faster on a shared 2-core box, and reproducible.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    model = load_demo_model()
    seconds = train(model, args.out, seed=args.seed, n_pairs=args.pairs, k=args.k, d_sae=args.d_sae,
                    training_tokens=args.tokens, lr=args.lr)
    print(f"trained in {seconds:.0f}s, saved to {args.out}")
    sae = SAE.load_from_disk(args.out)
    scores = evaluate(model, sae)
    print(f"held-out: explained variance {scores['explained_variance']:.4f}, L0 {scores['l0']:.2f}, "
          f"dead features {scores['dead_features']}/{sae.cfg.d_sae} ({scores['tokens']} tokens)")
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
