"""Pairs read as a stream (``PairStream``): every number equals what the same pairs give as lists
(themselves checked against exact patching elsewhere), in float64 with left padding and batch
sizes that do not divide the number of pairs; every source form; clear errors for sources that
cannot be streamed. Runs on a TransformerBridge, so under TransformerLens 3 and 4."""

from __future__ import annotations

import json
import math

import pytest
import torch

from atp_plugin import PairStream, attribute, false_negative_bound, metrics
from atp_plugin.edges import attribute_edges, faithfulness_of, top_circuit
from atp_plugin.errors import AtpError, MetricError
from atp_plugin.report import token_scores, write_report
from distributed_case import CLEAN, CORRUPT
from hf_models import load_bridge, save_gpt2

NODES = ["attn_q", "attn_k", "attn_z", "mlp_neurons"]
ANSWERS = [5, 7, 9, 11, 13]
WRONGS = [25, 27, 29, 31, 33]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_bridge(save_gpt2(tmp_path_factory.mktemp("gpt2")))


def labelled() -> list[tuple[str, str, list[int]]]:
    return [(c, k, [a, w]) for c, k, a, w in zip(CLEAN, CORRUPT, ANSWERS, WRONGS)]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12, equal_nan=True, msg=key)


@pytest.mark.parametrize("method", ["atp", "atp+qk", "atp*", "ap"])
def test_a_labelled_stream_gives_what_the_lists_give(model, method):
    lists = attribute(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), nodes=NODES, method=method,
                      batch_size=2)
    streamed = attribute(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), nodes=NODES,
                         method=method, batch_size=3)
    assert lists.pair_counts.tolist() == [2, 3, 5, 5, 5, 5]  # left padding: pairs of 4 to 6 tokens (with BOS)
    same(lists.scores, streamed.scores)
    same(lists.signed, streamed.signed)
    if lists.std_error is not None:
        same(lists.std_error, streamed.std_error)
    assert torch.equal(lists.pair_counts, streamed.pair_counts)
    assert (streamed.n_pairs, streamed.alignment) == (lists.n_pairs, lists.alignment)
    torch.testing.assert_close(torch.tensor(streamed.verify(4)[["effect", "mean_abs_effect"]].to_numpy()),
                               torch.tensor(lists.verify(4)[["effect", "mean_abs_effect"]].to_numpy()),
                               rtol=0, atol=1e-12)


def test_every_source_form_reads_the_same_pairs(model, tmp_path):
    expected = attribute(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), nodes=["attn_z"], method="atp")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"clean": c, "corrupt": k, "label": lab}) + "\n\n" for c, k, lab in labelled()))
    tokens = [(model.to_tokens(c)[0], model.to_tokens(k)[0].tolist(), lab)
              for c, k, lab in labelled()]
    sources = {
        "list": PairStream(labelled()),
        "function": PairStream(lambda: iter(labelled())),
        "dicts": PairStream([{"clean": c, "corrupt": k, "label": lab} for c, k, lab in labelled()]),
        "token ids": PairStream(tokens),
        "jsonl": PairStream.jsonl(path),
    }
    for name, stream in sources.items():
        got = attribute(model, stream, metric=metrics.logit_diff_labels(), nodes=["attn_z"], method="atp",
                        batch_size=4)
        same(expected.scores, got.scores)
        assert got.n_pairs == 5, name


def test_an_unlabelled_stream_gives_the_metric_pair_numbers(model):
    answers, wrongs = torch.tensor(ANSWERS), torch.tensor(WRONGS)
    seen: set[int] = set()

    def metric(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.update(idx.tolist())
        rows = torch.arange(len(idx))
        return logits[rows, -1, answers[idx]] - logits[rows, -1, wrongs[idx]]

    lists = attribute(model, CLEAN, CORRUPT, metric, nodes=["attn_z"], method="atp*")
    streamed = attribute(model, PairStream(list(zip(CLEAN, CORRUPT))), metric=metric, nodes=["attn_z"],
                         method="atp*", batch_size=2)
    same(lists.scores, streamed.scores)
    assert seen == set(range(5))


def test_per_pair_views_read_their_pair_from_the_stream(model, tmp_path):
    lists = attribute(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), nodes=["attn_z"], method="atp")
    streamed = attribute(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), nodes=["attn_z"],
                         method="atp", batch_size=2)
    for pair in (0, 4):
        torch.testing.assert_close(token_scores(streamed, pair), token_scores(lists, pair), rtol=0, atol=1e-12)
    page = write_report(streamed, tmp_path / "r.html", prompts=2).read_text()
    assert "pair 1" in page


def test_standard_errors_over_a_stream_follow_the_two_pass_formula(model):
    streamed = attribute(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), nodes=["attn_z"],
                         method="atp", batch_size=2)
    width = streamed.scores["attn_z"].shape[1]
    values = torch.full((5, *streamed.scores["attn_z"].shape), math.nan, dtype=torch.float64)
    for i, item in enumerate(labelled()):
        one = attribute(model, PairStream([item]), metric=metrics.logit_diff_labels(), nodes=["attn_z"], method="atp")
        values[i, :, width - one.scores["attn_z"].shape[1]:] = one.scores["attn_z"]
    n = (~values.isnan()).sum(0)
    mean = values.nan_to_num().sum(0) / n
    var = ((values - mean).nan_to_num() ** 2).sum(0) / (n - 1)
    torch.testing.assert_close(streamed.scores["attn_z"], mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(streamed.std_error["attn_z"], (var / n).sqrt(), rtol=1e-9, atol=1e-12)


def test_streams_that_cannot_be_read_twice_or_changed_are_refused(model):
    metric = metrics.logit_diff_labels()
    with pytest.raises(TypeError, match=r"PairStream\(lambda: my_pairs\(\)\)"):
        PairStream(iter(labelled()))
    with pytest.raises(TypeError, match="PairStream"):
        attribute(model, iter(labelled()), metric=metric)
    with pytest.raises(TypeError, match="no corrupt prompts"):
        attribute(model, PairStream(labelled()), CORRUPT, metric)
    with pytest.raises(TypeError, match="needs a metric"):
        attribute(model, PairStream(labelled()))
    for later in (labelled()[:3], labelled() + labelled()[:1], [labelled()[i] for i in (0, 2, 1, 3, 4)]):
        passes = iter([labelled(), later, later])  # fewer pairs, more pairs, the same pairs reordered
        with pytest.raises(AtpError, match="changed between passes"):
            attribute(model, PairStream(lambda passes=passes: iter(next(passes))), metric=metric, nodes=["attn_z"],
                      method="atp")


@pytest.mark.parametrize("items, match", [
    ([], "the stream is empty"),
    ([("a", "b", "c", "d")], r"pair 0 is \('a', 'b', 'c', 'd'\)"),
    ([{"clean": "w1 w2"}], r"pair 0 lacks the field\(s\) \['corrupt'\]"),
    ([("w1 w2", "w3 w4", [5, 25]), ("w1 w2", "w3 w4")], "pair 1 has no label but the first pair one of shape"),
    ([("w1 w2", "w3 w4 w5", [5, 25])], "pair 0 is not token-aligned"),
    ([([1, 2], [3], [5, 25])], "pair 0: clean has 2 tokens and corrupt 1"),
    ([([1, 2], [3, 10**6], [5, 25])], "outside the model's vocabulary"),
])
def test_bad_stream_items_name_the_pair(model, items, match):
    with pytest.raises(AtpError, match=match):
        attribute(model, PairStream(items), metric=metrics.logit_diff_labels(), nodes=["attn_z"], method="atp")


def test_bad_jsonl_lines_and_labels_are_named(model, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"clean": "w1 w2", "corrupt": "w3 w4", "label": [5, 25]}\n{"clean": oops}\n')
    with pytest.raises(AtpError, match=r"p.jsonl line 2 is not JSON"):
        attribute(model, PairStream.jsonl(path), metric=metrics.logit_diff_labels(), nodes=["attn_z"])
    with pytest.raises(FileNotFoundError, match="no pairs file"):
        PairStream.jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(MetricError, match="position -5, which is left padding"):
        attribute(model, PairStream(labelled()), metric=metrics.logit_diff_labels(position=-5), nodes=["attn_z"])
    with pytest.raises(MetricError, match=r"reads labels of shape \(2,\) but the pairs' labels have shape \(1,\)"):
        attribute(model, PairStream([(c, k, [a]) for c, k, a in zip(CLEAN, CORRUPT, ANSWERS)]),
                  metric=metrics.logit_diff_labels(), nodes=["attn_z"], method="atp")
    with pytest.raises(MetricError, match="outside the model's vocabulary"):
        attribute(model, PairStream(labelled()[:4] + [(CLEAN[4], CORRUPT[4], [5, 10**6])]),
                  metric=metrics.logit_diff_labels(), nodes=["attn_z"], method="atp")
    with pytest.raises(MetricError, match="the pairs have none"):
        attribute(model, CLEAN, CORRUPT, metrics.logit_diff_labels(), nodes=["attn_z"], method="atp")
    with pytest.raises(MetricError, match="use metrics.logit_diff_labels"):
        attribute(model, PairStream(labelled()), metric=metrics.logit_diff(ANSWERS, WRONGS), nodes=["attn_z"])
    with pytest.raises(TypeError, match="a PairStream holds both prompts"):
        attribute_edges(model, PairStream(labelled()), CORRUPT, metrics.logit_diff_labels())


@pytest.mark.parametrize("method", ["atp", "atp+qk", "ig", "ap"])
@pytest.mark.parametrize("per_position", [False, True])
def test_edges_on_a_stream_equal_the_lists(model, method, per_position):
    """Edge scores, their exact verification and a circuit's faithfulness read the pairs through the
    node engine's batching: the same numbers from a stream as from lists."""
    lists = attribute_edges(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), method=method, ig_steps=3,
                            per_position=per_position, batch_size=2)
    streamed = attribute_edges(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), method=method,
                               ig_steps=3, per_position=per_position, batch_size=3)
    same({"scores": lists.scores, "signed": lists.signed}, {"scores": streamed.scores, "signed": streamed.signed})
    assert torch.equal(lists.pairs, streamed.pairs) and streamed.n_pairs == lists.n_pairs == len(CLEAN)
    assert (streamed.forward_passes, streamed.backward_passes) == (lists.forward_passes, lists.backward_passes)
    torch.testing.assert_close(torch.tensor(streamed.verify(3)[["effect", "mean_abs_effect"]].to_numpy()),
                               torch.tensor(lists.verify(3)[["effect", "mean_abs_effect"]].to_numpy()),
                               rtol=0, atol=1e-12)
    if not per_position:
        circuit = top_circuit(lists, 6)
        assert abs(faithfulness_of(streamed, [circuit])[0] - faithfulness_of(lists, [circuit])[0]) < 1e-12


def test_the_bound_asks_for_lists(model):
    result = attribute(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), nodes=["attn_z"],
                       method="atp")
    with pytest.raises(ValueError, match="computed on a PairStream"):
        false_negative_bound(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), result, k=2,
                             n_subsets=20, p=0.3)


def test_select_keeps_the_first_pairs_and_finds_others_in_one_pass(model):
    items = labelled() * 4  # 20 pairs: past the 16 kept from the first pass
    reads: list[int] = []

    def source():
        reads.append(1)
        return iter(items)

    streamed = attribute(model, PairStream(source), metric=metrics.logit_diff_labels(), nodes=["attn_z"],
                         method="atp")
    lists = attribute(model, [c for c, _, _ in items], [k for _, k, _ in items],
                      metrics.logit_diff([a for _, _, (a, _) in items], [w for _, _, (_, w) in items]),
                      nodes=["attn_z"], method="atp")
    before = len(reads)
    for indices, passes in (([3, 0, 3], 0), ([18, 2, 19], 1)):
        got = streamed.engine.pairs.select(torch.tensor(indices))
        want = lists.engine.pairs.select(torch.tensor(indices))
        assert len(reads) == before + passes
        for field in ("clean", "corrupt", "mask"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert got.labels.tolist() == [items[i][2] for i in indices]
        before = len(reads)
    with pytest.raises(IndexError, match=r"in \[0, 20\)"):
        streamed.engine.pairs.select(torch.tensor([20]))


def test_feature_edges_on_a_stream_equal_the_lists(model):
    """features= on a stream: the node run that keeps the features and the edge run both read the
    stream; the same kept features and numbers as from lists."""
    from atp_plugin.adapters import TranscoderFeatures
    from helpers import random_simple_sae
    tc = random_simple_sae(5, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", d_sae=24)
    tc = tc.to(next(model.parameters()).dtype)
    features = [TranscoderFeatures(tc)]
    lists = attribute_edges(model, CLEAN, CORRUPT, metrics.logit_diff(ANSWERS, WRONGS), features=features, keep=3,
                            batch_size=2)
    streamed = attribute_edges(model, PairStream(labelled()), metric=metrics.logit_diff_labels(), features=features,
                               keep=3, batch_size=3)
    assert streamed.graph.names == lists.graph.names and any(".f" in n for n in lists.graph.names)
    same({"scores": lists.scores, "signed": lists.signed}, {"scores": streamed.scores, "signed": streamed.signed})
    assert (streamed.forward_passes, streamed.backward_passes) == (lists.forward_passes, lists.backward_passes)
