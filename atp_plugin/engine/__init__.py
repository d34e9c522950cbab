"""The shared gradient-and-fix core. It knows sites (hook points), never node types: adapters
map sites to nodes, backends combine what the engine computes."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import MetricError
from ..hosts import Host
from . import distributed, memory, progress
from . import qk as qkfix
from .estimates import Site, check_order, estimate_batch, sites_of
from .moments import Moments
from .pairs import Batch, PairSource
from .plans import NodePatches, NodeSet, PatchPlan, SetEffects, SetRange, single_nodes
from .runs import run

if TYPE_CHECKING:  # annotations only: the engine does not import the adapters package at run time
    from ..adapters import NodeAdapter

Metric = Callable[..., torch.Tensor]


def bind_metric(metric: Metric) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Call ``metric(logits, indices)``, or ``metric(logits)`` when it takes one argument, and
    check it returns one finite value per pair, differentiable where the logits are (AtP's
    gradient runs).

    Exact patching runs patched copies of pairs in batches of any make-up, so ``indices`` is how a
    metric knows which pair each row belongs to. A one-argument metric cannot know: it must
    compute each row from that row's logits alone. The first differentiable call checks that (on
    the batch reversed and on its first row alone) and that the metric's gradient is not zero
    everywhere (``sign``, ``round``, an answer equal to the wrong token): either would give
    silently wrong numbers.
    """
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(logits, indices) or metric(logits), got {metric!r}")
    try:
        params = [p for p in inspect.signature(metric).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        two = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):  # builtins without a signature: assume the documented form
        two = True
    name = getattr(metric, "__qualname__", repr(metric))
    checked = False

    def call(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        out = metric(logits, indices) if two else metric(logits)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"metric must return a tensor with one value per pair, got {type(out).__name__}")
        if out.shape != (logits.shape[0],):
            raise MetricError(f"metric must return one value per pair: expected shape ({logits.shape[0]},) "
                              f"for {logits.shape[0]} prompts, got {tuple(out.shape)}")
        if logits.requires_grad and not out.requires_grad:
            raise MetricError(
                f"metric {name!r} returned values that carry no gradient (dtype {out.dtype}, requires_grad=False), "
                "so AtP cannot differentiate it; compute it from the logits without detaching, .item(), integer "
                "casts or constants")
        if not torch.isfinite(out).all():
            bad = indices[~torch.isfinite(out).to(indices.device)].tolist()
            raise MetricError(f"metric returned non-finite values for pairs {bad[:10]}; check the metric and the "
                              "answer ids")
        if logits.requires_grad and not checked:
            checked = True
            if not two:
                _check_rowwise(metric, name, logits.detach(), out.detach())
            (grad,) = torch.autograd.grad(out.sum(), logits, retain_graph=True)
            if not bool(grad.any()):
                raise MetricError(
                    f"the gradient of metric {name!r} with respect to the logits is zero for every pair, so every "
                    "AtP score would be 0 and the ranking arbitrary: the metric is constant or piecewise constant "
                    "(sign, round, argmax, a comparison) or compares a token with itself (answer == wrong); use a "
                    "smooth metric such as metrics.logit_diff with distinct tokens")
        return out

    return call


def _check_rowwise(metric: Metric, name: str, logits: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse a one-argument metric whose value for a row depends on where the row sits in the
    batch (e.g. per-pair answers indexed by row): exact patching batches rows in other orders."""
    fix = (f"metric {name!r} takes only the logits, so it must compute each row from that row alone; it reads "
           "per-pair data by row position, which exact patching (verify, ap, baselines) reorders. Take the pair "
           "indices as a second argument: metric(logits, indices) -> one value per pair, with indices the pairs "
           "of the rows (the built-in metrics.logit_diff does)")
    with torch.no_grad():
        try:
            flipped = metric(logits.flip(0)).flip(0)
            first = metric(logits[:1])
        except (IndexError, RuntimeError, ValueError) as e:
            raise MetricError(f"{fix} (on a reordered batch it raised {type(e).__name__}: {e})") from e
    if not (torch.allclose(flipped, out, rtol=1e-5, atol=1e-6, equal_nan=True)
            and torch.allclose(first, out[:1], rtol=1e-5, atol=1e-6, equal_nan=True)):
        raise MetricError(fix)


class Engine:
    """Everything a backend needs: runs, gradients, the QK fix, GradDrop and exact patching over
    the pairs, in batches of ``batch_size`` pairs (memory does not grow with the number of pairs)."""

    def __init__(self, host: Host, pairs: PairSource, metric: Metric, adapters: list[NodeAdapter], *,
                 batch_size: int, patch_batch_size: int | None = None, max_memory: int | None = None,
                 progress: bool | None = None):
        self.host, self.pairs, self.adapters = host, pairs, adapters
        self.metric = bind_metric(metric)
        self.batch_size = batch_size
        # patched copies per forward pass: a fixed number, or sized from a byte budget (copies_per_pass)
        self.patch_batch_size, self.max_memory = patch_batch_size, max_memory
        self.progress = progress
        self.acc = torch.float64 if host.dtype == torch.float64 else torch.float32
        self.forward_passes = 0  # prompts run, counted as forward passes of one prompt
        # backward passes of one prompt; a partial one (GradDrop, below a cut) counts as the
        # fraction of the layers it runs through
        self.backward_passes = 0.0
        self._shapes: dict[tuple[int, str], tuple[int, ...]] | None = None
        # per site, the standard error over pairs of the last first_order()'s per-pair score
        self.score_std_error: dict[tuple[int, str], torch.Tensor] = {}

    # --- layout -----------------------------------------------------------------------------
    def sites(self, qk: bool = False) -> list[Site]:
        return sites_of(self.host, self.adapters, qk)

    def keys(self) -> dict[str, tuple[NodeAdapter, str]]:
        """Result key (adapter name + group) -> (adapter, group)."""
        return {a.name + grp: (a, grp) for a in self.adapters for grp in a.groups(self.host)}

    # --- copies ------------------------------------------------------------------------------
    def with_metric(self, metric: Metric) -> Engine:
        """A copy on the same model, pairs and node types that evaluates ``metric`` instead (bound
        and checked afresh), with its own pass counts from 0: what the false-negative bound patches
        with, on the user's metric, without touching the result's engine."""
        other = copy.copy(self)
        other.metric = bind_metric(metric)
        other.forward_passes, other.backward_passes = 0, 0.0
        return other

    def restricted(self, indices: torch.Tensor | list[int]) -> Engine:
        """A copy over the pairs ``indices`` only (in that order), with pass counts from 0. Its
        metric is called with the pairs' original indices, so per-pair data (answers) still lines
        up: what per-pair views (``report.token_scores``) rerun a method on."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.pairs.n:
            raise IndexError(f"restricted() takes pair indices in [0, {self.pairs.n}), got {idx.tolist()[:10]}")
        metric = self.metric
        other = copy.copy(self)
        other.pairs = self.pairs.select(idx)
        if other.pairs.labels is None:  # the metric gets pair numbers: the original ones
            other.metric = lambda logits, local: metric(logits, idx.to(local.device)[local])
        other.forward_passes, other.backward_passes = 0, 0.0
        return other

    # --- progress ----------------------------------------------------------------------------
    def progress_bar(self, total: int, desc: str, unit: str = "batch", *, exhaustive: bool = False) -> tqdm:
        """A progress bar over ``total`` steps, as ``progress`` asks: never with False, always with
        True; by default on a terminal for 4 steps or more (short loops stay quiet) and, for
        ``exhaustive`` work (``total`` patched prompts) above ``progress.PROGRESS_MIN``, also where
        stderr is not a terminal, as a line every ``progress.LINE_INTERVAL`` seconds."""
        if self.progress is not None:
            show: bool | None = self.progress
        elif exhaustive and total > progress.PROGRESS_MIN:
            show = True
        else:
            show = None if total >= 4 else False
        return progress.bar(total, desc, unit, show)

    def my_batches(self) -> tuple[int, list[int]]:
        """(batch size, the numbers of this rank's batches): ``batch_size`` pairs a batch, lowered
        where needed so that every rank of a ``torch.distributed`` run gets at least one."""
        size = distributed.batch_for_ranks(self.batch_size, self.pairs.n)
        return size, distributed.share(range(self.pairs.n_batches(size)))

    def batches(self, desc: str) -> Iterator[Batch]:
        """This rank's batches of ``batch_size`` pairs (all of them without ``torch.distributed``),
        with progress."""
        size, numbers = self.my_batches()
        with self.progress_bar(len(numbers), desc) as bar:
            for batch in self.pairs.batches(size, numbers):
                yield batch
                bar.update()

    def assemble(self, per_site: dict[tuple[int, str], torch.Tensor], sites: list[Site]) -> dict[str, torch.Tensor]:
        """Per-site tensors ``[pos, *node]`` keyed (site number, group) -> result tensors, a layered
        adapter's sites stacked by their layer index (whatever order ``per_site`` lists them in).
        Every site and group must be there exactly once: a missing or unknown one is an error."""
        expected = {(n, grp) for n, s in enumerate(sites) for grp in s.adapter.groups(self.host)}
        if set(per_site) != expected:
            missing, extra = sorted(expected - set(per_site)), sorted(set(per_site) - expected)
            raise ValueError(f"assemble() needs one tensor per (site number, group) of the {len(sites)} sites: "
                             f"missing {missing[:5]}, unknown {extra[:5]}")
        slots: dict[str, dict[int, torch.Tensor]] = {}
        for (n, grp), v in per_site.items():
            slots.setdefault(sites[n].adapter.name + grp, {})[sites[n].index] = v
        return {key: (torch.stack([vs[i] for i in range(len(vs))]) if "layer" in self._dims(key) else vs[0])
                for key, vs in slots.items()}

    def _dims(self, key: str) -> tuple[str, ...]:
        adapter, grp = self.keys()[key]
        return adapter.groups(self.host)[grp]

    def mean_over_pairs(self, sums: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
        """Divide sums over pairs by the number of pairs in which each position is real."""
        count = self.pairs.counts.to(self.acc)  # [pos]
        sums = {k: distributed.all_sum(v) for k, v in sums.items()}  # every rank's share of the pairs
        return {k: v / count.clamp(min=1).reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in sums.items()}

    # --- first order ---------------------------------------------------------------------
    def check_qk(self) -> None:
        """Fail before any run where a site the QK fix applies to sits in a layer whose attention
        the host cannot describe (an unsupported variant raises ``UnsupportedModelError``)."""
        for s in self.sites(qk=True):
            if s.qk_fixed:
                qkfix.fixable(self.host.attention(s.pos.layer),
                              "use method='atp' or 'atp+gd' for attn_q/attn_k nodes, or drop them from nodes=")

    def first_order(self, *, qk: bool, graddrop: bool) -> tuple[dict, dict, dict | None]:
        """Means over pairs of |I|, I and (with GradDrop) c_gd, per site: ``[pos, *node]``. With
        ``qk``, the attention of every QK-fixed site is checked first (``check_qk``)."""
        if qk:
            self.check_qk()
        sites = self.sites(qk)
        sums_abs: dict[tuple[int, str], torch.Tensor] = {}
        sums: dict[tuple[int, str], torch.Tensor] = {}
        sums_gd: dict[tuple[int, str], torch.Tensor] = {}
        graddrop = graddrop and self.host.n_layers > 1
        spread: dict[tuple[int, str], Moments] = {}  # of the per-pair score: |I|, or c_gd with GradDrop
        for batch in self.batches("attribution"):
            first, gd = estimate_batch(
                self.host, sites, batch.clean, batch.corrupt, batch.mask,
                lambda logits, key=batch.key: self.metric(logits, key), graddrop=graddrop, acc=self.acc)
            self.forward_passes += 2 * len(batch.idx)
            # one full backward, plus GradDrop's cut at layer l running through l of the L layers
            self.backward_passes += len(batch.idx) * (1 + ((self.host.n_layers - 1) / 2 if graddrop else 0))
            for k, v in first.items():
                score = gd[k] / (self.host.n_layers - 1) if gd is not None else v.abs()  # per pair
                _add(sums_abs, k, v.abs().sum(0))
                _add(sums, k, v.sum(0))
                if gd is not None:
                    _add(sums_gd, k, score.sum(0))
                spread.setdefault(k, Moments()).add(score, batch.mask)
        self.score_std_error = {k: m.std_error() for k, m in spread.items()}
        gd_mean = self.mean_over_pairs(sums_gd) if graddrop else None
        return self.mean_over_pairs(sums_abs), self.mean_over_pairs(sums), gd_mean

    # --- exact patching ----------------------------------------------------------------
    def corrupt_run(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and site values (and the values of hooks adapters read) of the corrupt prompts of
        ``batch``; not counted (the callers count it)."""
        sites = self.sites()
        with torch.no_grad():
            logits, acts = run(self.host, batch.corrupt, batch.mask, {h for s in sites for h in s.needs})
        check_order(sites, acts)
        return logits, acts

    def noise_values(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Site values (and the values of hooks adapters read) of the corrupt prompts of ``batch``."""
        _, acts = self.corrupt_run(batch)
        self.forward_passes += len(batch.idx)
        return acts

    def clean_metric(self, batch: Batch) -> torch.Tensor:
        """The metric on the unpatched clean prompts of ``batch``: ``[batch]``."""
        with torch.no_grad():
            logits, _ = run(self.host, batch.clean, batch.mask)
        self.forward_passes += len(batch.idx)
        return self.metric(logits, batch.key).to(self.acc)

    def patch_sets(self, plan: PatchPlan, desc: str) -> Iterator[SetEffects]:
        """The one exact-patching planner: the metric with each of ``plan``'s sets patched from the
        corrupt into the clean prompt of each pair, L(clean | S <- noise), yielded per batch of pairs
        and range of sets, with the batch's clean and corrupt metrics. Node patches, edge patches
        and circuits' complements (faithfulness) are plans (``plans``, ``edges.patching``).

        Many patched copies (set, pair) run in one forward pass: ``copies_per_pass``, with what a
        copy holds from ``plan.held`` (one set over one batch where ``plan.whole_batches``). A copy
        whose set patches no real (not padding) position of its pair would patch nothing: it is
        skipped, with ``patched`` False and the clean metric. Each batch of pairs costs a noise and
        a clean run. Under ``torch.distributed`` each rank patches its share of the batches of pairs.
        """
        size, numbers = self.my_batches()
        batches = self.pairs.batches(size, numbers)  # read once: a stream's first batch is not read twice
        first = next(batches)
        first_noise = plan.noise(first)
        budget = size if plan.whole_batches else self.copies_per_pass(plan.held(first_noise[1]))

        def per_pass(pairs: int) -> int:
            """Copies per forward pass in a batch of ``pairs`` pairs."""
            return pairs if plan.whole_batches else budget

        planned = [(int(patched.sum()), per_pass(len(mask))) for mask in self.pairs.masks(size, numbers)
                   for *_, patched in self._set_ranges(mask, plan, per_pass(len(mask)))]  # copies per range
        copies, passes = sum(c for c, _ in planned), sum(-(-c // n) for c, n in planned)
        announce = self.progress is not False and copies > progress.PROGRESS_MIN
        if announce:
            progress.say(desc, f"{copies:,} patched prompts in {passes:,} forward passes of up to {budget}, plus "
                               f"a noise and a clean run of each of the {self.pairs.n} pairs")
        timed = announce  # the first patched pass is timed for an estimate of the rest
        with self.progress_bar(copies, desc, unit="prompt", exhaustive=True) as bar:
            for b, batch in enumerate(itertools.chain([first], batches)):
                logits, noise = first_noise if b == 0 else plan.noise(batch)
                self.forward_passes += len(batch.idx)
                corrupt = self.metric(logits, batch.key).to(self.acc).cpu()  # [batch]
                del logits
                clean = self.clean_metric(batch).cpu()  # [batch]
                n_pass = per_pass(len(batch.idx))
                for start, stop, sets, patched in self._set_ranges(batch.mask, plan, n_pass):
                    value = clean.repeat(stop - start, 1)  # [sets, batch]
                    copy_set, copy_pair = patched.nonzero(as_tuple=True)  # [copies], ordered by set
                    for chunk in torch.arange(len(copy_set)).split(n_pass) if len(copy_set) else ():  # none: no run
                        cs, cp = copy_set[chunk], copy_pair[chunk]
                        copies_of = batch.rows(cp)
                        began = time.perf_counter()
                        with torch.no_grad():
                            patched_logits = sets.run(copies_of, noise, cp, cs)
                        self.forward_passes += len(cs)
                        value[cs, cp] = self.metric(patched_logits, copies_of.key).to(self.acc).cpu()
                        if timed:
                            took, timed = time.perf_counter() - began, False
                            progress.say(desc, f"the first pass took {progress.duration(took)}: about "
                                               f"{progress.duration(took * (passes - 1))} for the other {passes - 1:,}")
                        bar.update(len(cs))
                    yield SetEffects(batch.idx, start, stop, clean, corrupt, value, patched)

    def _set_ranges(self, mask: torch.Tensor, plan: PatchPlan, per_pass: int
                    ) -> Iterator[tuple[int, int, SetRange, torch.Tensor]]:
        """For the pairs of a batch (its ``mask`` ``[batch, T]``): consecutive ranges ``start..stop-1``
        of ``plan``'s sets (one empty range 0..0 where it has none) and which copies patch
        something, ``[sets, batch]`` bool.
        A range holds lcm(per_pass, batch) copies, so that it splits into full forward passes of
        ``per_pass`` copies (where none is skipped), with at most ``per_pass`` sets."""
        real = mask.cpu().float()  # [batch, T]
        step = per_pass // math.gcd(per_pass, len(mask))
        for start in range(0, max(plan.n_sets, 1), step):
            stop = min(start + step, plan.n_sets)
            sets = plan.sets(start, stop)
            yield start, stop, sets, (sets.touched.float() @ real.T) > 0

    def copies_per_pass(self, held: int = 0) -> int:
        """Patched copies per forward pass: ``patch_batch_size`` where given, else as many as fit
        in ``max_memory`` bytes (default: ``memory.default_budget``) at ``memory.forward_bytes`` of
        the prompt length each, plus ``held`` bytes per copy (its corrupt values and masks)."""
        if self.patch_batch_size is not None:
            return self.patch_batch_size
        budget = self.max_memory if self.max_memory is not None else memory.default_budget(self.host.device)
        return memory.copies_per_pass(memory.forward_bytes(self.host, self.pairs.width, held), budget)

    def mean_effects(self, plan: PatchPlan, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Means over pairs of the effect I = L(clean | S <- noise) - L(clean) of each of ``plan``'s
        sets and of |I| (what AtP's score, a mean of per-pair magnitudes, estimates), over the pairs
        where the set patches something: ``[n_sets]`` each, summed over ranks."""
        sums, abs_sums, count = torch.zeros(3, plan.n_sets, dtype=self.acc)
        for got in self.patch_sets(plan, desc):
            effect = got.effect  # [sets, batch]
            sums[got.start:got.stop] += effect.sum(1)
            abs_sums[got.start:got.stop] += effect.abs().sum(1)
            count[got.start:got.stop] += got.patched.sum(1)
        for total in (sums, abs_sums, count):
            distributed.all_sum(total)  # every rank's share of the pairs
        return sums / count.clamp(min=1), abs_sums / count.clamp(min=1)

    def exact_effects(self, nodes: NodeSet, desc: str = "exact patching") -> tuple[NodeSet, NodeSet]:
        """Mean over pairs of the exact effect I(n) = L(clean | n <- noise) - L(clean) of each node,
        and the mean over pairs of |I(n)|.

        ``nodes``: (site number, group) -> flat indices into that site's ``[pos, *node]``. Joint
        patching of single nodes (``mean_effects``): one patched copy per (pair, node), skipping
        pairs where the node's position is padding; the means are over the other pairs.
        """
        n_nodes = sum(len(v) for v in nodes.values())
        means, abs_means = self.mean_effects(NodePatches(self, nodes, single_nodes, n_nodes), desc)
        sizes = [len(v) for v in nodes.values()]
        return dict(zip(nodes, means.split(sizes))), dict(zip(nodes, abs_means.split(sizes)))

    def node_shapes(self, noise: dict[str, torch.Tensor] | None = None) -> dict[tuple[int, str], tuple[int, ...]]:
        """(site number, group) -> node grid ``(pos, *node)`` (cached): from ``noise`` (values of a
        noise run) where given, else from a probe run of one prompt."""
        if self._shapes is None:
            probe = noise if noise is not None else self.noise_values(next(self.pairs.batches(1, [0])))
            one = {h: v[:1] for h, v in probe.items()}  # one prompt is enough for the shapes
            self._shapes = {(n, grp): tuple(enc.shape[1:-1]) for n, s in enumerate(self.sites())
                            for grp, enc in s.adapter.encode(s.hook, s.value(one)).items()}
        return self._shapes

    def exact(self) -> dict[tuple[int, str], torch.Tensor]:
        """Mean over pairs of the exact effect of every node, per site ``[pos, *node]``."""
        shapes = self.node_shapes()
        effects, _ = self.exact_effects({k: torch.arange(math.prod(shape)) for k, shape in shapes.items()})
        return {k: effects[k].reshape(shapes[k]).to(self.host.device) for k in shapes}


def _add(acc: dict, key, value: torch.Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value
