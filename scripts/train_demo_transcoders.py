"""Train the transcoders shipped in ``atp_plugin/data/transcoders`` with plain PyTorch (no SAE-Lens).

One top-k transcoder per layer of the bundled IOI demo model: transcoder L reads
``blocks.L.ln2.hook_normalized`` (the MLP's input LayerNorm output *before* its weight and bias, which
the encoder absorbs, being linear) and predicts ``blocks.L.hook_mlp_out``, the MLP's output:
``f = TopK(k)(x W_enc + b_enc)``, ``y^ = f W_dec + b_dec``, 512 features, k=16 active per token.

Training data: both hooks' activations on the clean and corrupt prompts of train-split IOI pairs,
BOS positions left out (their vectors are the same in every prompt, so they never carry an effect).
Adam on the MSE of the MLP output, a warm-up then cosine decay of the learning rate, decoder rows
renormalised to unit norm after every step (a feature's activation is then the norm of what it
writes), and an AuxK term (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") that trains
features silent for a while on the reconstruction's residual, so that few features stay dead. Seeded
and run with deterministic kernels: the same seed and thread count give the same weights.

Each transcoder is saved as ``layer{L}/cfg.json`` (architecture, widths, k, hooks, training settings)
and ``layer{L}/weights.safetensors`` (float32 ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec``
[d_sae, d_out], ``b_dec``), and read by ``atp_plugin.demo_task.load_demo_transcoders`` as
``atp_plugin.saes.SimpleSAE(..., activation=TopK(k))``.

Prints, from the weights loaded back from disk: per layer the held-out (test split) fraction of
variance of ``hook_mlp_out`` explained, mean L0 and dead features; and the fraction of the mean IOI
logit difference (logit(answer) - logit(wrong) at the last token, on test-split clean prompts) that
the model keeps when all four MLP outputs, or each one alone, are replaced by their transcoders'
outputs (no error term; at every position but BOS, whose MLP outputs stay the model's own).

Runs under TransformerLens 4 (a ``TransformerBridge``) and 3 (a ``HookedTransformer``).

Usage: python scripts/train_demo_transcoders.py [--out atp_plugin/data/transcoders] [--seed S] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # train this checkout's code, installed or not

from atp_plugin import metrics  # noqa: E402
from atp_plugin.demo_task import PROMPT_LENGTH, ioi_pairs, load_demo_model  # noqa: E402
from atp_plugin.saes import SimpleSAE, TopK, load_topk_transcoder  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "atp_plugin" / "data" / "transcoders"
HOOK_IN, HOOK_OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"


@torch.no_grad()
def activations(model: Any, layers: list[int], n_pairs: int, seed: int, split: str,
                chunk: int = 1000) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the input and output hooks' activations ``([tokens, d_in], [tokens, d_out])`` on the
    clean and corrupt prompts of ``n_pairs`` pairs of ``split``, BOS positions left out."""
    pairs = ioi_pairs(n_pairs, seed=seed, split=split)
    prompts = pairs.clean + pairs.corrupt
    names = {HOOK_IN.format(layer) for layer in layers} | {HOOK_OUT.format(layer) for layer in layers}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(prompts), chunk):
        tokens = model.to_tokens(prompts[start:start + chunk])  # [chunk, 1 + PROMPT_LENGTH]
        assert tokens.shape[1] == 1 + PROMPT_LENGTH
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        for name in names:
            parts[name].append(cache[name][:, 1:].reshape(-1, cache[name].shape[-1]).float())
    return {layer: (torch.cat(parts[HOOK_IN.format(layer)]), torch.cat(parts[HOOK_OUT.format(layer)]))
            for layer in layers}


class TrainingTranscoder(torch.nn.Module):
    """The transcoder being trained (the same function as the ``SimpleSAE`` it is saved as)."""

    def __init__(self, d_in: int, d_sae: int, d_out: int, k: int, generator: torch.Generator):
        super().__init__()
        w_dec = torch.randn(d_sae, d_out, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(w_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc  # [batch, d_sae]

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def train_layer(x: torch.Tensor, y: torch.Tensor, *, d_sae: int, k: int, steps: int, batch: int, lr: float,
                warmup: int, aux_k: int, aux_coef: float, dead_tokens: int, seed: int) -> tuple[SimpleSAE, int]:
    """One transcoder from inputs ``x`` ``[tokens, d_in]`` to outputs ``y`` ``[tokens, d_out]``; returns
    it (as a ``SimpleSAE``) and the number of features dead (silent for ``dead_tokens``) at the end."""
    generator = torch.Generator().manual_seed(seed)
    tc = TrainingTranscoder(x.shape[1], d_sae, y.shape[1], k, generator)
    with torch.no_grad():
        tc.b_dec.copy_(y.mean(0))  # start at the mean output
    top = TopK(k)
    optimizer = torch.optim.Adam(tc.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    y_var = (y - y.mean(0)).pow(2).sum(-1).mean()  # losses are reported relative to the output's variance
    since_fired = torch.zeros(d_sae, dtype=torch.long)  # tokens since each feature last fired
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        xb, yb = x[idx], y[idx]
        pre = tc.pre(xb)
        f = top(pre)  # [batch, d_sae]
        recon = f @ tc.W_dec + tc.b_dec
        loss = (recon - yb).pow(2).sum(-1).mean() / y_var
        with torch.no_grad():
            fired = (f > 0).any(0)
            since_fired = torch.where(fired, 0, since_fired + batch)
            dead = since_fired >= dead_tokens
        if aux_coef and int(dead.sum()) > 0:
            # AuxK: the dead features' top pre-activations reconstruct what the live ones miss
            n_aux = min(aux_k, int(dead.sum()))
            aux = TopK(n_aux)(pre.masked_fill(~dead, -torch.inf))  # [batch, d_sae], dead features only
            residual = (yb - recon).detach()
            aux_loss = (aux @ tc.W_dec - residual).pow(2).sum(-1).mean() / y_var
            loss = loss + aux_coef * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        tc.normalise_decoder()
    simple = SimpleSAE(tc.W_enc.detach().clone(), tc.b_enc.detach().clone(), tc.W_dec.detach().clone(),
                       tc.b_dec.detach().clone(), TopK(k))
    return simple, int((since_fired >= dead_tokens).sum())


def save(tc: SimpleSAE, out: Path, layer: int, k: int, training: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "topk_transcoder",
        "d_in": tc.W_enc.shape[0], "d_sae": tc.W_enc.shape[1], "d_out": tc.W_dec.shape[1], "k": k,
        "hook_name": HOOK_IN.format(layer), "hook_name_out": HOOK_OUT.format(layer),
        "model_name": "atp-ioi-demo", "dtype": "float32",
        "encoder": "f = TopK(k)(x @ W_enc + b_enc)", "decoder": "y = f @ W_dec + b_dec",
        "training": training,
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({name: getattr(tc, name).detach().float().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(out / "weights.safetensors"))


@torch.no_grad()
def reconstruction(tc: SimpleSAE, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Explained variance of ``y`` (1 - SSE / SST, SST about the mean), mean L0, dead features."""
    f = tc.encode(x)
    sse = (y - tc.decode(f)).pow(2).sum()
    sst = (y - y.mean(0)).pow(2).sum()
    return {"explained_variance": float(1 - sse / sst), "l0": float((f > 0).sum(-1).float().mean()),
            "dead": int(((f > 0).sum(0) == 0).sum())}


@torch.no_grad()
def logit_diff_kept(model: Any, transcoders: list[SimpleSAE], n_pairs: int, seed: int) -> dict[str, float]:
    """Mean logit difference on ``n_pairs`` test-split clean prompts with the MLP outputs of each set of
    layers replaced by their transcoders' outputs (BOS position kept), as a fraction of the model's own."""
    pairs = ioi_pairs(n_pairs, seed=seed, split="test")
    tokens = model.to_tokens(pairs.clean)
    metric = metrics.logit_diff(metrics.token_ids(model, pairs.answers), metrics.token_ids(model, pairs.wrongs))
    rows = torch.arange(n_pairs)

    def run(layers: list[int]) -> float:
        stash: dict[int, torch.Tensor] = {}
        hooks = []
        for layer in layers:
            def read(act: torch.Tensor, hook: Any, layer: int = layer) -> None:
                stash[layer] = act

            def write(act: torch.Tensor, hook: Any, layer: int = layer) -> torch.Tensor:
                tc = transcoders[layer]
                out = act.clone()
                out[:, 1:] = tc.decode(tc.encode(stash[layer][:, 1:].to(tc.W_enc.dtype))).to(act.dtype)
                return out

            hooks += [(HOOK_IN.format(layer), read), (HOOK_OUT.format(layer), write)]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        return float(metric(logits, rows).mean())

    base = run([])
    kept = {"all": run(list(range(len(transcoders)))) / base}
    kept |= {f"layer {layer}": run([layer]) / base for layer in range(len(transcoders))}
    return {"model_logit_diff": base, **kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for layer{L}/ (cfg.json, weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=8000, help="train-split pairs (2 prompts each, 14 tokens each)")
    parser.add_argument("--k", type=int, default=16, help="active features per token (top-k)")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per layer")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aux-coef", type=float, default=1 / 32, help="AuxK loss weight (0: none)")
    # One thread by default, as for the model and the SAE: faster on a shared 2-core box, and reproducible.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = load_demo_model()
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    layers = list(range(n_layers))
    training = {"optimizer": "Adam", "lr": args.lr, "schedule": "linear warm-up 100 steps, cosine decay to 0",
                "steps": args.steps, "batch_tokens": args.batch, "loss": "MSE of hook_mlp_out / its variance",
                "decoder_rows": "unit norm", "aux_k": 2 * args.k, "aux_coef": args.aux_coef,
                "dead_after_tokens": 20 * args.batch,
                "data": f"ioi_pairs({args.pairs}, seed={args.seed}, split='train'), clean and corrupt, BOS excluded",
                "seed": args.seed, "threads": args.threads, "model_class": type(model).__name__,
                "script": "scripts/train_demo_transcoders.py"}
    start = time.perf_counter()
    train_acts = activations(model, layers, args.pairs, args.seed, "train")
    for layer in layers:
        x, y = train_acts[layer]
        tc, dead = train_layer(x, y, d_sae=args.d_sae, k=args.k, steps=args.steps, batch=args.batch, lr=args.lr,
                               warmup=100, aux_k=2 * args.k, aux_coef=args.aux_coef,
                               dead_tokens=20 * args.batch, seed=args.seed * 1_000_003 + layer)
        save(tc, args.out / f"layer{layer}", layer, args.k, {**training, "train_tokens": len(x)})
        print(f"layer {layer}: trained on {len(x)} tokens, {dead} features silent in its last "
              f"{20 * args.batch} tokens, {time.perf_counter() - start:.0f}s", flush=True)
    del train_acts
    print(f"trained in {time.perf_counter() - start:.0f}s (d_mlp {d_mlp}, d_sae {args.d_sae}, k {args.k}), "
          f"saved to {args.out}")

    # everything below reads the saved files back, as atp_plugin.demo_task.load_demo_transcoders does
    transcoders = [load_topk_transcoder(args.out / f"layer{layer}") for layer in layers]
    test_acts = activations(model, layers, 2000, 1234, "test")
    for layer, tc in enumerate(transcoders):
        scores = reconstruction(tc, *test_acts[layer])
        print(f"layer {layer} held-out ({len(test_acts[layer][0])} tokens): explained variance of "
              f"{tc.hook_name_out} {scores['explained_variance']:.4f}, L0 {scores['l0']:.2f}, "
              f"dead features {scores['dead']}/{args.d_sae}")
    kept = logit_diff_kept(model, transcoders, 200, 1234)
    print(f"logit difference on 200 test pairs: model {kept['model_logit_diff']:.4f}; fraction kept with "
          f"all MLPs replaced {kept['all']:.4f}; "
          + ", ".join(f"{name} alone {kept[name]:.4f}" for name in (f"layer {layer}" for layer in layers)))
    total = 0
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.relative_to(args.out)}: {path.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
