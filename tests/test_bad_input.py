"""Bad input gets a clear error (what is wrong, how to fix it) before any heavy work.

"Before heavy work" is measured: a forward pre-hook on the token embedding counts forward passes
(``run_with_hooks`` calls ``model.forward`` directly, so a hook on the model itself would never
fire); input errors must be raised with none run, metric errors after the first batch only.

On a HookedTransformer (TransformerLens 3) and a TransformerBridge (both); the tests that need one of
HookedTransformer's configurations (no tokenizer, attention-only, dropout hooks, attention sinks)
run where it exists.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from atp_plugin import attribute, attribute_edges, metrics, verify
from atp_plugin.engine.pairs import Pairs
from atp_plugin.errors import UnsupportedModelError
from atp_plugin.metrics import check_metric
from conftest import HOSTS, VARIANTS, host_model, logit_diff_metric, make_bridge, make_model, make_pairs, needs_hooked
from helpers import word_tokenizer, words_model

ALL_NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons", "resid_pre"]
ALL_METHODS = ["ap", "atp", "atp*", "atp+gd", "atp+qk"]


@contextmanager
def counting_forwards(model: torch.nn.Module, length: int | None = None) -> Iterator[list[int]]:
    """Count the model's forward passes inside the block: ``calls[0]``. Every run, however it is
    started (``model(...)``, ``run_with_hooks``, ``run_with_cache``), embeds its tokens once. With
    ``length``, only runs on prompts of that many tokens count: the runs on the pairs, not the hook
    check a TransformerBridge's host runs once per new hook point on a fixed 4-token prompt."""
    calls = [0]

    def count(module, args) -> None:
        if length is None or args[0].shape[-1] == length:
            calls[0] += 1

    handle = model.embed.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def raises_before_any_forward(model, exc, match: str, *args, **kwargs) -> None:
    with counting_forwards(model) as calls, pytest.raises(exc, match=match):
        attribute(model, *args, **kwargs)
    assert calls[0] == 0, f"{calls[0]} forward passes ran before the error"


@pytest.fixture(scope="module", params=HOSTS)
def model(request):
    return host_model(request.param)


def test_forward_counter_sees_every_run(model) -> None:
    """The counter the tests below rely on fires on every way a run starts, the engine's included."""
    clean, corrupt = make_pairs(2, 4)
    with counting_forwards(model) as calls:
        model(clean)
    assert calls[0] == 1
    with counting_forwards(model) as calls:
        model.run_with_hooks(clean, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)])
    assert calls[0] == 1
    with counting_forwards(model) as calls:
        attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["attn_z"], method="ap")
    assert calls[0] > 0


def test_clean_and_corrupt_shapes_differ(model) -> None:
    clean, corrupt = make_pairs(3, 6)
    raises_before_any_forward(model, ValueError, r"clean tokens have shape \(3, 6\) but corrupt tokens \(3, 5\).*"
                              r"token-aligned", clean, corrupt[:, :5], logit_diff_metric(3))
    raises_before_any_forward(model, ValueError, "clean has 3 prompts but corrupt has 2", clean, corrupt[:2],
                              logit_diff_metric(3))


def test_string_pair_lengths_differ(host) -> None:
    model = words_model(host)
    clean = ["w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    corrupt = ["w1 w2 w0", "w4 w5 w6", "w8 w1"]
    raises_before_any_forward(model, ValueError, r"pair 1 is not token-aligned: clean 'w4 w5 w6 w7' has 4 tokens, "
                              r"corrupt 'w4 w5 w6' has 3", clean, corrupt, logit_diff_metric(3))


@needs_hooked
def test_strings_without_tokenizer() -> None:
    model = make_model()  # no tokenizer (a Bridge always has one)
    raises_before_any_forward(model, ValueError, "no tokenizer.*token tensors", ["a b"], ["a c"], logit_diff_metric(1))


def test_unknown_node_type_lists_known_ones(model) -> None:
    clean, corrupt = make_pairs(2, 4)
    with pytest.raises(ValueError, match="unknown node type 'attn_x'; known node types: ") as err:
        attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["attn_z", "attn_x"])
    assert all(name in str(err.value) for name in ALL_NODES)


def test_unknown_method_lists_known_ones(model) -> None:
    clean, corrupt = make_pairs(2, 4)
    with pytest.raises(ValueError, match=r"unknown method 'atp\*\*'; known methods: ") as err:
        attribute(model, clean, corrupt, logit_diff_metric(2), method="atp**")
    assert all(name in str(err.value) for name in ALL_METHODS)


def test_metric_wrong_shape(model) -> None:
    clean, corrupt = make_pairs(4, 5)

    def scalar(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0].mean()

    with counting_forwards(model, length=5) as calls, pytest.raises(
            ValueError, match=r"metric must return one value per pair: expected shape \(1,\) for 1 prompts, got \(\)"):
        attribute(model, clean, corrupt, scalar, method="atp", batch_size=1)
    assert calls[0] <= 2, "the metric was only checked after more than the first batch"  # noise + clean run

    def not_a_tensor(logits: torch.Tensor) -> float:
        return 1.0

    with pytest.raises(TypeError, match="metric must return a tensor with one value per pair, got float"):
        attribute(model, clean, corrupt, not_a_tensor, method="atp")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metric_non_finite(model, bad: float) -> None:
    clean, corrupt = make_pairs(4, 5)

    def metric(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = logits[:, -1, 0].clone()
        return torch.where(indices == 2, torch.full_like(out, bad), out)

    with counting_forwards(model, length=5) as calls, \
            pytest.raises(ValueError, match=r"non-finite values for pairs \[2\]"):
        attribute(model, clean, corrupt, metric, method="atp")
    assert calls[0] <= 2


def test_metric_answers_for_other_number_of_pairs(model) -> None:
    clean, corrupt = make_pairs(3, 5)
    raises_before_any_forward(model, ValueError, "the metric holds answers for 5 pairs but 3 pairs were given",
                              clean, corrupt, logit_diff_metric(5))


@needs_hooked
def test_model_lacks_hook() -> None:
    model = make_model(**VARIANTS["attn_only"])
    clean, corrupt = make_pairs(2, 4)
    raises_before_any_forward(model, ValueError, r"lacks hook\(s\) \['blocks.0.mlp.hook_post'.*choose node types",
                              clean, corrupt, logit_diff_metric(2), nodes=["attn_z", "mlp_neurons"])


def test_empty_input(model) -> None:
    metric = logit_diff_metric(2)
    raises_before_any_forward(model, ValueError, "no prompt pairs given", [], [], metric)
    empty = torch.zeros(0, 5, dtype=torch.long)
    raises_before_any_forward(model, ValueError, "no prompt pairs given", empty, empty, metric)
    no_tokens = torch.zeros(2, 0, dtype=torch.long)
    raises_before_any_forward(model, ValueError, r"the prompts are empty \(zero tokens\)", no_tokens, no_tokens, metric)
    clean, corrupt = make_pairs(2, 4)
    raises_before_any_forward(model, ValueError, "nodes= is empty", clean, corrupt, metric, nodes=[])


def test_malformed_tokens(model) -> None:
    clean, corrupt = make_pairs(2, 4)
    metric = logit_diff_metric(2)
    raises_before_any_forward(model, ValueError, r"outside the model's vocabulary \[0, 50\)", clean + 50, corrupt,
                              metric)
    raises_before_any_forward(model, TypeError, "must hold integer token ids", clean.double(), corrupt.double(), metric)
    raises_before_any_forward(model, TypeError, "not a single string", "w1 w2", "w1 w3", metric)
    raises_before_any_forward(model, ValueError, "batch_size must be a positive", clean, corrupt, metric, batch_size=0)


def dropout_model(host: str):
    """A test model with a permanent dropout hook: training mode is visibly random."""
    model = host_model(host)
    model.add_hook("blocks.0.hook_resid_mid", lambda x, hook: F.dropout(x, 0.5, training=hook.training),
                   is_permanent=True)
    return model


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
def test_training_mode_warns_and_matches_eval(host) -> None:
    """A dropout hook makes training mode visibly random; attribute() must run in eval mode (with
    a warning) and leave the model as it found it."""
    model = dropout_model(host)
    clean, corrupt = make_pairs(3, 5)
    metric = logit_diff_metric(3)
    try:
        model.train()
        assert not torch.equal(model(clean), model(clean))  # dropout is live in training mode
        for method in ("atp*", "ap"):
            model.train()
            model.blocks[0].ln1.eval()  # a submodule the user keeps in eval mode stays so
            with pytest.warns(UserWarning, match="training mode.*eval mode.*model.eval\\(\\)"):
                trained = attribute(model, clean, corrupt, metric, nodes=["attn_z", "attn_q"], method=method)
            assert model.training, "attribute() must restore training mode"
            kept = set(model.blocks[0].ln1.modules())
            assert all(m.training != (m in kept) for m in model.modules())
            model.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no training-mode warning in eval mode
                warnings.filterwarnings("ignore", ".*GradDrop degenerates")
                evaluated = attribute(model, clean, corrupt, metric, nodes=["attn_z", "attn_q"], method=method)
            for nt in ("attn_z", "attn_q"):
                assert torch.equal(trained.scores[nt], evaluated.scores[nt]), (method, nt)
                assert torch.equal(trained.signed[nt].nan_to_num(), evaluated.signed[nt].nan_to_num()), (method, nt)
    finally:
        model.reset_hooks(including_permanent=True)


def test_verify_in_training_mode_warns_and_matches_eval(host) -> None:
    """verify() patches in eval mode too: in training mode it warns, and its effects equal those
    verified in eval mode (with dropout live they would be random)."""
    model = dropout_model(host)
    clean, corrupt = make_pairs(3, 5)
    try:
        result = attribute(model, clean, corrupt, logit_diff_metric(3), nodes=["attn_z"], method="atp")
        expected = result.verify(6)
        for check in (result.verify, lambda k: verify(result, k)):
            model.train()
            with pytest.warns(UserWarning, match=r"training mode.*verify\(\) runs it in eval mode.*model.eval\(\)"):
                got = check(6)
            assert model.training, "verify() must restore training mode"
            pd.testing.assert_frame_equal(got, expected)
    finally:
        model.reset_hooks(including_permanent=True)


@needs_hooked
@pytest.mark.parametrize("flag, what", [
    (dict(use_attention_sinks=True), "attention sinks"),
    (dict(use_logn_attn=True, positional_embedding_type="rotary", rotary_dim=8), "log-n attention scaling"),
    (dict(positional_embedding_type="alibi"), r"ALiBi \(a position bias added to the scores\)"),
])
def test_unsupported_attention_for_qk_fix(flag: dict, what: str) -> None:
    model = make_model(**flag)
    clean, corrupt = make_pairs(2, 5)
    metric = logit_diff_metric(2)
    for method in ("atp+qk", "atp*"):
        raises_before_any_forward(model, UnsupportedModelError, f"QK fix cannot handle {what}.*method='atp'",
                                  clean, corrupt, metric, nodes=["attn_z", "attn_k"], method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("atp", "atp+gd"):
            result = attribute(model, clean, corrupt, metric, nodes=["attn_q", "attn_k"], method=method)
            assert result.scores["attn_k"].abs().sum() > 0
        # the fix is needed only by q/k nodes: atp* on other node types still works
        result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp*")
        assert result.scores["attn_z"].abs().sum() > 0
    # edges: one policy with the nodes (the edge fix recomputes the scores as well)
    with pytest.raises(UnsupportedModelError, match=f"QK fix cannot handle {what}.*method='atp'"):
        attribute_edges(model, clean, corrupt, metric, method="atp+qk")


def test_metric_answer_ids_and_position(model) -> None:
    """Answer ids outside [0, d_vocab) and positions outside the prompt fail before any run (a
    negative id would otherwise wrap around, a large one fail deep inside the clean run)."""
    clean, corrupt = make_pairs(2, 5)
    with pytest.raises(ValueError, match=r"answer holds negative token ids \(pairs \[1\]\)"):
        metrics.logit_diff([3, -1], [4, 5])
    with pytest.raises(ValueError, match=r"wrong holds negative token ids \(pairs \[0\]\)"):
        metrics.logit_diff([3, 1], [-4, 5])
    with pytest.raises(ValueError, match="answer holds negative token ids"):
        metrics.log_prob([-3, 1])
    with pytest.raises(TypeError, match=r"answer holds strings; the metric takes token ids: "
                                        r"metrics.token_ids\(model, \[' Mary'\]\)"):
        metrics.logit_diff([" Mary"], [" John"])
    with pytest.raises(TypeError, match="position must be an int"):
        metrics.logit_diff([3, 1], [4, 5], position=True)
    for metric in (metrics.logit_diff([3, 50], [4, 5]), metrics.logit_diff([3, 1], [4, 77]), metrics.log_prob([50, 1])):
        raises_before_any_forward(model, ValueError,
                                  r"answer ids include \d+, outside the model's vocabulary \[0, 50\)",
                                  clean, corrupt, metric)
    for position in (5, -6):
        for metric in (metrics.logit_diff([3, 1], [4, 5], position=position),
                       metrics.log_prob([3, 1], position=position)):
            raises_before_any_forward(model, ValueError, rf"reads position {position} but the prompts have 5 tokens",
                                      clean, corrupt, metric)
    for position in (4, -5, 0):  # the edges are valid
        tokens = torch.zeros(2, 5, dtype=torch.long)
        pairs = Pairs(tokens, tokens, torch.ones(2, 5, dtype=torch.bool))
        check_metric(metrics.logit_diff([3, 1], [4, 49], position=position), pairs, 50)


def test_metric_position_on_left_padding(host) -> None:
    """Left-padded pairs of 4 and 2 tokens: positions 0 and 1 (-4, -3) are padding in the short
    pair, so a metric reading them would read a pad token's logits; -1 and -2 (2, 3) are real."""
    model = words_model(host)
    clean, corrupt = ["w1 w2 w3 w4", "w5 w6"], ["w1 w7 w3 w4", "w8 w6"]
    for position in (0, 1, -4, -3):
        raises_before_any_forward(model, ValueError, rf"reads position {position}, which is left padding in the "
                                  r"prompts shorter than 4 tokens \(the shortest has 2\).*-1 to -2",
                                  clean, corrupt, metrics.logit_diff([3, 1], [4, 5], position=position))
    for position in (2, 3, -1, -2):
        attribute(model, clean, corrupt, metrics.logit_diff([3, 1], [4, 5], position=position), nodes="attn_z",
                  method="atp")


def _detached(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 0] - logits[:, -1, 1]).detach()


def _via_item(logits: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(x.item()) for x in logits[:, -1, 0] - logits[:, -1, 1]], dtype=logits.dtype)


def _integer(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1)


def _constant(logits: torch.Tensor) -> torch.Tensor:
    return torch.ones(logits.shape[0], dtype=logits.dtype)


@pytest.mark.parametrize("metric", [_detached, _via_item, _integer, _constant])
def test_metric_without_gradient(model, metric) -> None:
    """A metric AtP cannot differentiate fails with its name and the fix after the first clean run,
    not deep inside autograd; exact patching needs no gradient and still takes it."""
    clean, corrupt = make_pairs(3, 5)
    with counting_forwards(model, length=5) as calls, pytest.raises(
            ValueError, match=rf"metric '{metric.__name__}' returned values that carry no gradient.*without detaching, "
                              r"\.item\(\)"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp")
    assert calls[0] <= 2, "the metric was only checked after more than the first batch"  # noise + clean run
    attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="ap")


def test_empty_string_prompt(host) -> None:
    """A prompt with no tokens besides BOS would be an all-padding row: an error naming the pair."""
    model = words_model(host)
    for empty in ("", "   "):
        raises_before_any_forward(model, ValueError, rf"pair 1: the clean prompt '{empty}' has no tokens",
                                  ["w1 w2", empty], ["w1 w3", empty], logit_diff_metric(2))
        raises_before_any_forward(model, ValueError, rf"pair 0: the corrupt prompt '{empty}' has no tokens",
                                  ["w1"], [empty], logit_diff_metric(1))
    if host == "hooked":
        with_bos = make_model(**VARIANTS["ln_gelu"], default_prepend_bos=True)
        with_bos.set_tokenizer(word_tokenizer())
    else:
        with_bos = make_bridge(0, 3, prepend_bos=True)
    raises_before_any_forward(with_bos, ValueError, r"pair 2: the clean prompt '' has no tokens \(besides BOS\)",
                              ["w1 w2", "w4", ""], ["w1 w3", "w5", ""], logit_diff_metric(3))
    # one real token after the BOS is a prompt
    result = attribute(with_bos, ["w1 w2", "w4"], ["w1 w3", "w5"], logit_diff_metric(2), nodes=["attn_z"], method="atp")
    assert result.scores["attn_z"].shape == (3, 3, 4) and result.pair_counts.tolist() == [1, 2, 2]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(patch_batch_size=0), ValueError, r"patch_batch_size must be a positive int, got 0; it is the number of"),
    (dict(patch_batch_size=-3), ValueError, r"patch_batch_size must be a positive int, got -3"),
    (dict(patch_batch_size=2.5), TypeError, r"patch_batch_size must be a positive int, got 2.5 \(float\)"),
    (dict(patch_batch_size=True), TypeError, r"patch_batch_size must be a positive int, got True \(bool\)"),
    (dict(batch_size=2.5), TypeError,
     r"batch_size must be a positive int, got 2.5 \(float\); it is the number of pairs"),
    (dict(batch_size=True), TypeError, r"batch_size must be a positive int, got True \(bool\)"),
    (dict(batch_size=-1), ValueError, r"batch_size must be a positive int, got -1"),
    (dict(nodes=None), TypeError, r"nodes= must be a node type name, a NodeAdapter or a list of them, got None"),
    (dict(nodes=3), TypeError, r"nodes= must be a node type name.*got 3"),
])
def test_bad_numeric_arguments(model, kwargs: dict, exc: type, match: str) -> None:
    clean, corrupt = make_pairs(2, 4)
    raises_before_any_forward(model, exc, match, clean, corrupt, logit_diff_metric(2), method="ap", **kwargs)


@pytest.mark.parametrize("variant", [pytest.param("ln_gelu", marks=needs_hooked),
                                     pytest.param("rms_rotary_gated", marks=needs_hooked), "bridge"])
def test_prompts_longer_than_context(variant: str) -> None:
    model = make_bridge() if variant == "bridge" else make_model(**VARIANTS[variant])  # n_ctx 16
    clean, corrupt = make_pairs(2, 17)
    raises_before_any_forward(model, ValueError, r"the prompts are 17 tokens long.*n_ctx is 16; shorten the prompts",
                              clean, corrupt, logit_diff_metric(2))
    result = attribute(model, clean[:, 1:], corrupt[:, 1:], logit_diff_metric(2), nodes=["attn_z"], method="atp")
    assert result.scores["attn_z"].shape[1] == 16


def test_string_prompts_longer_than_context_are_not_cut_off(host) -> None:
    """TransformerLens's to_tokens truncates text to n_ctx by default: a long string prompt would
    silently become its first 16 tokens (the metric read mid-prompt). It must fail like tokens do."""
    model = words_model(host)  # n_ctx 16
    words = " ".join(f"w{i}" for i in range(17))
    raises_before_any_forward(model, ValueError, r"the prompts are 17 tokens long.*n_ctx is 16",
                              [words], [words.replace("w3", "w40")], logit_diff_metric(1))


def test_top_and_verify_k(model) -> None:
    """top(k) needs k >= 1; verify(k) past the number of nodes verifies them all, saying so."""
    clean, corrupt = make_pairs(2, 3)
    result = attribute(model, clean, corrupt, logit_diff_metric(2), nodes=["attn_z"], method="atp")
    for k in (0, -2):
        with pytest.raises(ValueError, match=f"k must be at least 1 \\(a number of nodes\\), got {k}"):
            result.top(k)
    with pytest.raises(TypeError, match="k must be an int"):
        result.top(2.0)
    n = 2 * 3 * 4  # layers x positions x heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at exactly n
        everything = result.verify(n)
    assert len(everything) == n
    with pytest.warns(UserWarning, match=f"k=100 is more than the {n} nodes of this result; verifying all {n} "
                                         f"\\(k clamped to {n}\\)"):
        clamped = result.verify(100)
    pd.testing.assert_frame_equal(clamped, everything)


def test_words_the_tokenizer_does_not_know() -> None:
    """A word-level tokenizer maps unknown words to <unk>: the prompt, the answer token and the
    pair are named, with the vocabulary when it is small (the demo model's), before any run.
    A tokenizer whose unknown token is its padding or BOS/EOS (GPT-2 style) is not flagged."""
    from atp_plugin.demo_task import load_demo_model
    from atp_plugin.tokens import unknown_id

    demo = load_demo_model()
    assert unknown_id(demo.tokenizer) == demo.tokenizer.unk_token_id
    known = "When Mary and John went to the store, John gave a drink to"
    raises_before_any_forward(demo, ValueError, r"pair 1: the prompt 'When Zed and John.*\['Zed'\].*'<unk>'.* Mary ",
                              [known, known.replace("Mary", "Zed")], [known, known.replace("Mary", "Zed")],
                              metrics.logit_diff([4, 4], [5, 5]))
    with pytest.raises(ValueError, match=r"the answer token ' Marry' holds word\(s\) \['Marry'\]"):
        metrics.token_ids(demo, [" Mary", " Marry"])
    assert metrics.token_ids(demo, [" Mary"]).tolist() == [demo.to_single_token(" Mary")]
    with pytest.raises(ValueError, match=r"the answer token ' Mary John' is 2 tokens; it must be exactly one token"):
        metrics.token_ids(demo, [" Mary John"])
    assert unknown_id(word_tokenizer()) is None  # its unknown token is its padding token


def test_identical_clean_and_corrupt_prompts_warn(model) -> None:
    clean, corrupt = make_pairs(3, 5)
    corrupt[1] = clean[1]
    with pytest.warns(UserWarning, match=r"^pair 1 has a corrupt prompt equal to the clean one"):
        attribute(model, clean, corrupt, logit_diff_metric(3), nodes="attn_z", method="atp")
    with pytest.warns(UserWarning, match="every pair's corrupt prompt equals its clean prompt"):
        result = attribute(model, clean, clean, logit_diff_metric(3), nodes="attn_z", method="atp")
    assert not result.scores["attn_z"].any()
