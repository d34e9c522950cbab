"""``ig``: node attribution with integrated gradients along the embedding path (the node twin of
EAP-IG, so node and edge results compare).

Iig(n) = (n(noise) - n(clean)) . mean_{k=1..m} dL/dn at the run whose embedding (what
``blocks.0.hook_resid_pre`` holds) is clean + (k/m)(noise - clean): Hanna et al.'s "inputs"
variant with the right-endpoint rule, m = ``steps``; the last point is the corrupt prompt itself,
whose run also gives the corrupt values. Costs one forward pass (the clean prompt) and m forward +
backward passes per pair. For a metric quadratic along the path the error is exactly c/m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.pairs import Batch
from ..engine.path import DEFAULT_STEPS, check_steps, interpolate, path_points
from ..engine.runs import run
from ..hookspecs import hookimpl

EMBED_HOOK = "blocks.0.hook_resid_pre"


@dataclass(frozen=True)
class IntegratedGradients:
    """Node IG with ``steps`` gradient points; scores mean over pairs of |Iig|, signed the means."""

    steps: int = DEFAULT_STEPS
    name: str = "ig"

    def __post_init__(self) -> None:
        check_steps(self.steps)

    def run(self, engine):
        sites = engine.sites()
        sums_abs: dict = {}
        sums: dict = {}
        for batch in engine.batches(f"ig ({self.steps} steps)"):
            est = self._batch(engine, sites, batch)
            engine.forward_passes += (1 + self.steps) * len(batch.idx)
            engine.backward_passes += self.steps * len(batch.idx)
            for key, v in est.items():
                sums_abs[key] = sums_abs.get(key, 0) + v.abs().sum(0)
                sums[key] = sums.get(key, 0) + v.sum(0)
        return (engine.assemble(engine.mean_over_pairs(sums_abs), sites),
                engine.assemble(engine.mean_over_pairs(sums), sites))

    def _batch(self, engine, sites, batch: Batch) -> dict[tuple[int, str], torch.Tensor]:
        """Iig per pair ``[batch, pos, *node]`` keyed by (site number, group); 0 at padding."""
        host, acc = engine.host, engine.acc
        tokens, corrupt, mask = batch.clean, batch.corrupt, batch.mask
        needs = {h for s in sites for h in s.needs}
        hooks = sorted({s.hook for s in sites})
        pulled: dict[tuple[int, str], torch.Tensor] = {}

        def point(prompts: torch.Tensor, patches: dict | None) -> dict[str, torch.Tensor]:
            """One point's forward + backward: adds its gradients to ``pulled``; its values."""
            with torch.enable_grad():
                logits, values = run(host, prompts, mask, needs | ({EMBED_HOOK} if patches is None else set()), patches)
                grads = dict(zip(hooks, torch.autograd.grad(engine.metric(logits, batch.key).sum(),
                                                            [values[h] for h in hooks])))
            with torch.no_grad():
                fixed = {h: v.detach() for h, v in values.items()}
                for n, s in enumerate(sites):
                    for grp, g in s.adapter.pullback(s.hook, s.value(fixed), grads[s.hook]).items():
                        pulled[n, grp] = pulled.get((n, grp), 0) + g.to(acc)
            return fixed

        # the path's last point (alpha = 1) is the corrupt prompt itself: its run also gives the
        # corrupt values and the embedding the other points move towards
        noise = point(corrupt, None)
        with torch.no_grad():
            _, clean = run(host, tokens, mask, needs)
        deltas = {}
        for n, s in enumerate(sites):
            enc_n, enc_c = s.adapter.encode(s.hook, s.value(noise)), s.adapter.encode(s.hook, s.value(clean))
            deltas[n] = {grp: (enc_n[grp] - enc_c[grp]).to(acc) for grp in enc_c}
        for alpha in path_points(self.steps)[:-1]:
            point(tokens, {EMBED_HOOK: interpolate(noise[EMBED_HOOK], alpha)})
        real = mask.to(acc)
        out = {}
        for (n, grp), g in pulled.items():
            prod = deltas[n][grp] * g / self.steps
            est = prod.squeeze(-1) if prod.shape[-1] == 1 else prod.sum(-1)  # [batch, pos, *node]
            out[n, grp] = est * real.reshape(real.shape + (1,) * (est.ndim - 2))
        return out


@hookimpl
def atp_register_backends(register):
    register(IntegratedGradients())
