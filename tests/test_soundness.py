"""No silent wrong numbers: metrics that would give wrong effects or arbitrary rankings are refused
by name, and per-site results land in their own layer whatever order a backend lists them in; on a
HookedTransformer (TransformerLens 3) and a TransformerBridge (both)."""

from __future__ import annotations

import pytest
import torch

from atp_plugin import attribute, metrics
from atp_plugin.backends.builtin import FirstOrder
from atp_plugin.demo_task import load_demo_model
from atp_plugin.errors import AtpError, MetricError
from conftest import host_model, logit_diff_metric, make_pairs


def test_a_one_argument_metric_reading_answers_by_row_is_refused(host):
    """verify() patches copies of pairs in batches of its own make-up: a metric that reads answer
    i from row i would compare the wrong rows (it gave -0.504 where the truth was -0.0287)."""
    model = host_model(host)
    clean, corrupt = make_pairs(n=4)
    answers, wrongs = torch.tensor([3, 5, 7, 9]), torch.tensor([4, 6, 8, 10])

    def by_row(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, answers[: len(rows)]] - logits[rows, -1, wrongs[: len(rows)]]

    with pytest.raises(MetricError, match=r"reads per-pair data by row position.*metric\(logits, indices\)"):
        attribute(model, clean, corrupt, by_row, nodes="attn_z", method="atp")


def test_a_one_argument_metric_that_works_row_by_row_verifies_like_the_indexed_one(host):
    model = host_model(host)
    clean, corrupt = make_pairs(n=5)
    one = attribute(model, clean, corrupt, lambda logits: logits[:, -1, 3] - logits[:, -1, 4], nodes="attn_z",
                    method="atp", patch_batch_size=3)
    two = attribute(model, clean, corrupt, metrics.logit_diff([3] * 5, [4] * 5), nodes="attn_z", method="atp")
    torch.testing.assert_close(one.scores["attn_z"], two.scores["attn_z"], rtol=1e-12, atol=1e-14)
    a, b = one.verify(6), two.verify(6)
    assert a["node"].tolist() == b["node"].tolist()
    torch.testing.assert_close(torch.tensor(a["effect"].to_numpy()), torch.tensor(b["effect"].to_numpy()),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("metric, why", [
    (lambda logits, idx: torch.sign(logits[:, -1, 3] - logits[:, -1, 4]), "sign"),
    (lambda logits, idx: torch.round(logits[:, -1, 3]), "round"),
    (metrics.logit_diff([3] * 4, [3] * 4), "answer == wrong"),
])
def test_a_metric_whose_gradient_is_zero_everywhere_is_refused(host, metric, why):
    model = host_model(host)
    clean, corrupt = make_pairs(n=4)
    with pytest.raises(MetricError, match=r"gradient of metric .* is zero for every pair.*answer == wrong"):
        attribute(model, clean, corrupt, metric, nodes="attn_z", method="atp")


def test_metric_errors_are_atp_errors_and_value_errors():
    assert issubclass(MetricError, AtpError) and issubclass(AtpError, ValueError)


class Reordered(FirstOrder):
    """AtP whose per-site dicts list the sites last layer first, or drop one."""

    def __init__(self, name: str, drop: bool = False):
        super().__init__(name, qk=False, graddrop=False)
        object.__setattr__(self, "drop", drop)

    def run(self, engine):
        sites = engine.sites()
        mean_abs, mean, _ = engine.first_order(qk=False, graddrop=False)
        keys = sorted(mean_abs, reverse=True)[: len(mean_abs) - 1 if self.drop else None]
        return (engine.assemble({k: mean_abs[k] for k in keys}, sites),
                engine.assemble({k: mean[k] for k in keys}, sites))


def test_per_site_results_are_placed_by_layer_not_by_dict_order(host):
    model = host_model(host, n_layers=3)
    clean, corrupt = make_pairs(n=3)
    metric = logit_diff_metric(3)
    base = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="atp")
    other = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method=Reordered("rev"))
    for key in base.scores:
        torch.testing.assert_close(other.scores[key], base.scores[key], rtol=0, atol=0)
        torch.testing.assert_close(other.signed[key], base.signed[key], rtol=0, atol=0)


def test_a_missing_site_is_an_error_not_a_shifted_layer(host):
    model = host_model(host, n_layers=3)
    clean, corrupt = make_pairs(n=3)
    with pytest.raises(ValueError, match=r"missing \[\(0, ''\)\]"):
        attribute(model, clean, corrupt, logit_diff_metric(3), nodes="attn_z", method=Reordered("drop", drop=True))


def test_token_ids_refuses_a_bare_string():
    model = load_demo_model()
    with pytest.raises(TypeError, match=r"list of strings, got the string ' Mary'.*token_ids\(model, \[' Mary'\]\)"):
        metrics.token_ids(model, " Mary")
    assert metrics.token_ids(model, [" Mary"]).shape == (1,)


def test_inference_mode_is_refused_before_any_run(host):
    model = host_model(host)
    clean, corrupt = make_pairs(n=2)
    with torch.inference_mode(), pytest.raises(AtpError, match=r"inference_mode\(\).*outside"):
        attribute(model, clean, corrupt, logit_diff_metric(2), nodes="attn_z")


def test_a_model_on_the_meta_device_is_refused(host):
    model = torch.nn.Module.to_empty(host_model(host), device="meta")
    with pytest.raises(AtpError, match=r"'meta' device.*load real weights"):
        attribute(model, *make_pairs(n=2), logit_diff_metric(2), nodes="attn_z")


def test_top_selects_on_tensors_the_rows_to_frame_would_rank_first(host):
    """top(k) builds only k rows; they are to_frame()'s k largest scores, in order, with its columns
    (node_type, node, layer, pos, node coordinates, score, signed, pairs, std_error), for mixed node types."""
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(n=3)
    result = attribute(model, clean, corrupt, logit_diff_metric(3), nodes=["attn_z", "mlp_neurons", "resid_pre"],
                       method="atp")
    full = result.to_frame()
    for view, frame in ((result, full), (result.sum_over_positions(), result.sum_over_positions().to_frame())):
        for k in (1, 7, 50, len(frame) + 5):
            top = view.top(k)
            expected = frame.sort_values("score", ascending=False, kind="stable").head(k)
            assert top["node"].tolist() == expected["node"].tolist()
            assert list(top.columns) == list(frame.columns)
            assert top["score"].tolist() == expected["score"].tolist()
            assert top["signed"].tolist() == expected["signed"].tolist()
    assert list(full.columns) == ["node_type", "node", "layer", "pos", "head", "neuron", "score", "signed", "pairs",
                                  "std_error"]
    top = result.top(9)
    assert (full.loc[top.index, "node"] == top["node"]).all()  # top's index: the rows' numbers in to_frame()
