"""The engine's public operations (copies on another metric or other pairs, the QK pre-check,
progress) and the result fields the rest of the library reads instead of the engine's insides."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from atp_plugin import attribute, plugins
from atp_plugin.backends.baselines import BASELINE_BACKENDS
from atp_plugin.backends.builtin import BUILTIN_BACKENDS
from atp_plugin.backends.ig import IntegratedGradients
from atp_plugin.bound import false_negative_bound
from atp_plugin.errors import UnsupportedModelError
from atp_plugin.report import token_scores
from conftest import HOSTS, host_model, logit_diff_metric, make_model, make_pairs, needs_hooked, needs_hooked_for
from helpers import PADDED_CLEAN, PADDED_CORRUPT, padded_metric, words_model

needs_sinks = needs_hooked_for("attention sinks (a HookedTransformer option)")


@pytest.fixture(scope="module", params=HOSTS)
def setup(request):
    model = host_model(request.param)
    clean, corrupt = make_pairs(4, 5)
    metric = logit_diff_metric(4)
    return model, clean, corrupt, metric


def test_with_metric_is_a_fresh_copy_on_the_same_pairs(setup) -> None:
    model, clean, corrupt, metric = setup
    engine = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp").engine
    before = engine.forward_passes
    assert before > 0
    doubled = engine.with_metric(lambda logits, idx: 2 * metric(logits, idx))
    assert doubled is not engine and doubled.forward_passes == 0 and doubled.backward_passes == 0
    assert doubled.pairs is engine.pairs and doubled.host is engine.host and doubled.adapters is engine.adapters
    batch = next(engine.pairs.batches(4))
    torch.testing.assert_close(doubled.clean_metric(batch), 2 * engine.clean_metric(batch))
    assert doubled.forward_passes == 4 and engine.forward_passes == before + 4  # counted apart


def test_the_bound_patches_on_a_copy_and_leaves_the_result_engine_alone(setup) -> None:
    model, clean, corrupt, metric = setup
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp")
    before = result.engine.forward_passes
    bound = false_negative_bound(model, clean, corrupt, metric, result, k=2, n_subsets=20, p=0.3)
    assert result.engine.forward_passes == before
    assert bound.forward_passes > 0


def test_restricted_keeps_the_original_pair_indices_for_the_metric(setup) -> None:
    model, clean, corrupt, metric = setup
    engine = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp").engine
    seen: list[list[int]] = []

    def recording(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx.tolist())
        return metric(logits, idx)

    sub = engine.with_metric(recording).restricted([3, 1])
    assert sub.pairs.n == 2 and torch.equal(sub.pairs.clean, clean[[3, 1]])
    values = sub.clean_metric(next(sub.pairs.batches(2)))
    assert seen[-1] == [3, 1]
    torch.testing.assert_close(values, engine.clean_metric(next(engine.pairs.batches(4)))[[3, 1]])
    assert sub.forward_passes == 2
    with pytest.raises(IndexError, match=r"pair indices in \[0, 4\)"):
        engine.restricted([4])


def test_token_scores_of_a_pair_equal_a_run_on_that_pair_alone(setup) -> None:
    """report.token_scores reruns the method through ``Engine.restricted``: the same numbers as
    attribute() on that one pair with its own metric."""
    model, clean, corrupt, metric = setup
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="atp")
    alone = attribute(model, clean[2:3], corrupt[2:3], lambda logits, idx: metric(logits, idx + 2),
                      nodes=["attn_z", "mlp_neurons"], method="atp")
    expected = sum(v.sum(dim=(0, *range(2, v.ndim))) for v in alone.scores.values())
    torch.testing.assert_close(token_scores(result, 2), expected.double())


@needs_sinks
def test_the_qk_precheck_runs_for_any_backend_asking_for_the_qk_fix() -> None:
    """``Engine.first_order(qk=True)`` checks the attention first, so a plugin backend without a
    ``qk`` attribute fails before any forward pass, as the built-ins do."""
    class Custom:
        name = "custom-qk"

        def run(self, engine):
            sites = engine.sites(qk=True)
            mean_abs, mean, _ = engine.first_order(qk=True, graddrop=False)
            return engine.assemble(mean_abs, sites), engine.assemble(mean, sites)

    model = make_model(use_attention_sinks=True)
    clean, corrupt = make_pairs(2, 5)
    calls = [0]
    handle = model.embed.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        with pytest.raises(UnsupportedModelError, match="QK fix cannot handle attention sinks"):
            attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["attn_k"], method=Custom())
    finally:
        handle.remove()
    assert calls[0] == 0


def test_result_counts_pairs_per_position_as_pair_counts(setup) -> None:
    model, clean, corrupt, metric = setup
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp")
    assert result.pair_counts.tolist() == [4] * 5
    assert not hasattr(result, "pairs")  # engine.pairs are the prompts; the counts have their own name
    assert result.to_frame()["pairs"].tolist() == [4] * result.scores["attn_z"].numel()
    assert result.sum_over_positions().pair_counts.tolist() == [4] * 5


def test_backends_carry_no_unused_description() -> None:
    backends = [*BUILTIN_BACKENDS, *BASELINE_BACKENDS, IntegratedGradients()]
    assert all("description" not in {f.name for f in fields(b)} for b in backends)
    assert set(plugins.backends()) >= {b.name for b in backends}


def test_progress_bar_follows_the_progress_setting(setup, capsys) -> None:
    model, clean, corrupt, metric = setup
    engine = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", progress=False).engine
    with engine.progress_bar(10, "quiet") as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
    engine.progress = True  # stderr here is not a terminal: plain lines
    with engine.progress_bar(10, "shown") as bar:
        bar.update(10)
    err = capsys.readouterr().err
    assert "shown" in err and "\r" not in err and err.endswith("\n")


def test_exact_patching_is_joint_patching_of_single_nodes(setup) -> None:
    """``exact_effects`` and ``joint_effects`` run one generator (``Engine.patch_sets``): sets of
    one node each give the exact effects, pair by pair."""
    from atp_plugin.backends.baselines import joint_effects

    model, clean, corrupt, metric = setup
    engine = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", batch_size=3).engine
    nodes = {(0, ""): torch.tensor([0, 5, 17]), (1, ""): torch.tensor([2, 19])}
    means, abs_means = engine.exact_effects(nodes)
    per_pair = joint_effects(engine, nodes, lambda start, stop: torch.eye(5, dtype=torch.bool)[start:stop], 5, "")
    torch.testing.assert_close(torch.cat([means[k] for k in nodes]).double(), per_pair.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([abs_means[k] for k in nodes]).double(), per_pair.abs().mean(1),
                               rtol=0, atol=1e-12)


def test_a_joint_patch_with_every_node_at_padding_is_not_run(host) -> None:
    """A copy whose set has no node at a real position of its pair patches nothing: it is not
    run (no forward pass charged) and its effect is exactly 0."""
    from atp_plugin.backends.baselines import joint_effects

    model = words_model(host)
    engine = attribute(model, PADDED_CLEAN, PADDED_CORRUPT, padded_metric(), nodes=["attn_z"], method="atp").engine
    assert engine.pairs.mask[0].tolist() == [False, False, True, True, True]  # pair 0: positions 0, 1 padding
    n_heads = model.cfg.n_heads
    nodes = {(0, ""): torch.arange(2 * n_heads)}  # layer 0, every head at positions 0 and 1
    before = engine.forward_passes
    effects = joint_effects(engine, nodes, lambda start, stop: torch.ones(stop - start, 2 * n_heads, dtype=torch.bool),
                            2, "")
    assert engine.forward_passes - before == 2 * 3 + 2 * 2  # noise + clean runs; 2 sets x the 2 other pairs
    assert effects[:, 0].tolist() == [0.0, 0.0] and bool((effects[:, 1] != 0).all())


def test_exact_patching_encodes_node_shapes_once(setup) -> None:
    """Node shapes are learned once (from the first noise run) and cached, not re-derived per batch."""
    model, clean, corrupt, metric = setup
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", batch_size=1)
    adapter = result.require_engine("test").adapters[0]
    calls = [0]
    encode = adapter.encode

    def counting(hook, value):
        calls[0] += 1
        return encode(hook, value)

    object.__setattr__(adapter, "encode", counting)
    try:
        result.verify(3)
    finally:
        object.__delattr__(adapter, "encode")
    assert calls[0] == model.cfg.n_layers  # one per site, for 4 batches of one pair


ONE = ["--clean", "w1 w2", "--corrupt", "w1 w3", "--answer", "w4", "--wrong", "w5", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hf_models import save_gpt2

    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_atp_rank_lets_an_internal_error_through_with_its_traceback(model_dir, monkeypatch) -> None:
    """A ValueError that is not one of the library's input errors (AtpError) is a bug: ``atp rank``
    must not dress it up as a usage message."""
    from atp_plugin import cli
    from atp_plugin.commands import rank

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(rank, "attribute", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["rank", "--model", str(model_dir), *ONE])


def test_atp_rank_reports_input_errors_of_the_library_as_usage(model_dir, capsys) -> None:
    """The library's input errors (AtpError) stay one-line usage messages, exit code 2: prompts past
    the model's context, a node type whose hooks the model lacks."""
    from atp_plugin import cli

    long = " ".join(f"w{i}" for i in range(1, 21))
    argv = ["rank", "--model", str(model_dir), "--clean", long, "--corrupt", long.replace("w3 ", "w30 "),
            "--answer", "w4", "--wrong", "w5", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("atp rank: error: the prompts are 21 tokens long")  # BOS + 20 words
    assert len(err.splitlines()) == 1


@needs_hooked
def test_a_node_type_the_model_lacks_is_an_input_error() -> None:
    """The library's error for hooks the model lacks is an input error (UnsupportedModelError, an
    AtpError), which ``atp rank`` reports as usage (an attention-only HookedTransformer)."""
    model = make_model(attn_only=True)
    clean, corrupt = make_pairs(2, 4)
    with pytest.raises(UnsupportedModelError, match=r"the model lacks hook\(s\)"):
        attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["mlp_neurons"], method="atp")


def test_atp_rank_without_quiet_shows_no_bar_for_short_work_off_a_terminal(model_dir, capsys) -> None:
    """Off a terminal, ``atp rank`` prints progress only for exhaustive work (here: one batch of
    AtP and 4 verified copies, so none); ``--quiet`` also silences that."""
    from atp_plugin import cli

    assert cli.main(["rank", "--model", str(model_dir), *ONE[:-1], "--verify", "2"]) == 0
    err = capsys.readouterr().err
    assert "attribution" not in err and "verifying" not in err and "%|" not in err, err


@needs_sinks
def test_an_unsupported_attention_fails_before_the_graddrop_warning() -> None:
    """atp* on a 2-layer model whose attention the QK fix cannot handle: the error comes first, with
    no warning about GradDrop for a run that never happens."""
    import warnings

    model = make_model(use_attention_sinks=True)
    clean, corrupt = make_pairs(2, 5)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UnsupportedModelError):
        warnings.simplefilter("always")
        attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["attn_k"], method="atp*")
    assert [str(w.message) for w in caught] == []
