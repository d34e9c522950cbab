"""The HTML report: the numbers it shows (heatmaps, per-token shading) against independent
reductions of the result, and the page as a real headless Chromium renders it; on a random GPT-2 as
a HookedTransformer (TransformerLens 3) and as a TransformerBridge (both)."""

from __future__ import annotations

import base64
import re

import matplotlib.image
import pytest
import torch

from atp_plugin import attribute, metrics
from atp_plugin.report import figure_path, heatmap_grid, token_scores, write_report
from conftest import HOSTS
from hf_models import load_bridge, load_hooked, save_gpt2
from html_report import Dom, chromium, external_urls

NODES = ["attn_z", "attn_q", "mlp_neurons", "resid_pre"]
CLEAN = ["w1 w2 w3 w4 w5", "w7 w8 w9", "w10 w11 w12 w13"]  # left-padded to 6 tokens (with BOS)
CORRUPT = ["w1 w6 w3 w4 w5", "w7 w20 w9", "w10 w11 w30 w13"]


@pytest.fixture(scope="module", params=HOSTS)
def model(request, tmp_path_factory):
    path = save_gpt2(tmp_path_factory.mktemp("gpt2"))
    return load_hooked(path) if request.param == "hooked" else load_bridge(path)


@pytest.fixture(scope="module")
def result(model):
    return attribute(model, CLEAN, CORRUPT, metrics.logit_diff([5, 6, 7], [8, 9, 10]), nodes=NODES, method="atp+qk")


def test_figures_beside_the_html_have_portable_names(tmp_path):
    """An SAE's result keys hold ':' and '.': the figures' names keep only letters, digits, '_' and '-'
    (a ':' is not allowed in Windows file names), and write_report writes exactly those files."""
    from atp_plugin.adapters import SAEFeatures
    from atp_plugin.demo_task import ioi_pairs, load_demo_model, load_demo_sae

    model, task = load_demo_model(), ioi_pairs(2, seed=0, split="test")
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    result = attribute(model, task.clean, task.corrupt, metric, nodes=["attn_z", SAEFeatures(load_demo_sae())],
                       method="atp")
    write_report(result, tmp_path / "out.html", prompts=0)
    sae = "out_sae_blocks_2_hook_resid_pre"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["out.html", "out_attn_z.png", f"{sae}.png", f"{sae}_error.png"]
    assert figure_path(tmp_path / "out.html", "sae:blocks.2.hook_resid_pre.error") == \
        tmp_path / "out_sae_blocks_2_hook_resid_pre_error.png"


def test_heatmaps_reduce_the_scores_as_labelled(result):
    heads = heatmap_grid(result, "attn_z")  # [layer, pos, head] -> layer x head
    assert (heads.ylabel, heads.xlabel, heads.reduction) == ("layer", "head", "summed over positions")
    torch.testing.assert_close(heads.values, sum(result.scores["attn_z"][:, t].double() for t in range(6)))
    neurons = heatmap_grid(result, "mlp_neurons")  # 128 neurons: too wide, layer x pos
    assert (neurons.xlabel, neurons.reduction) == ("pos", "summed over the neuron axis")
    torch.testing.assert_close(neurons.values, torch.stack([result.scores["mlp_neurons"][:, :, n].double()
                                                            for n in range(128)]).sum(0))
    resid = heatmap_grid(result, "resid_pre")
    assert (resid.xlabel, resid.reduction) == ("pos", "per position")
    torch.testing.assert_close(resid.values, result.scores["resid_pre"].double())


@pytest.mark.parametrize("method", ["atp+qk", "atp*"])
def test_token_scores_average_to_the_scores_at_each_position(model, method):
    """Scores are means over pairs of per-pair magnitudes, so the per-pair token sums, averaged
    over the pairs where a position is real, give the result's scores summed at that position."""
    with pytest.warns(UserWarning, match="few layers") if method == "atp*" else _nothing():
        result = attribute(model, CLEAN, CORRUPT, metrics.logit_diff([5, 6, 7], [8, 9, 10]), nodes=NODES,
                           method=method)
    per_pair = torch.stack([token_scores(result, i) for i in range(3)])  # [pair, pos]
    real = result.engine.pairs.mask.cpu()
    assert (per_pair[~real] == 0).all()
    pairs = result.engine.pairs
    for i in range(3):  # nothing differs before the first changed token, so nothing is attributed there
        first = int((pairs.clean[i] != pairs.corrupt[i]).nonzero()[0])
        assert (per_pair[i, :first] == 0).all() and (per_pair[i, first:] > 0).all()
    expected = sum(v.double().movedim(result.dims[k].index("pos"), 0).reshape(6, -1).sum(-1)
                   for k, v in result.scores.items())
    torch.testing.assert_close(per_pair.sum(0) / real.sum(0), expected, rtol=1e-10, atol=1e-12)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_report_renders_in_headless_chromium(result, tmp_path):
    verified = result.verify(5)
    page = write_report(result, tmp_path / "report.html", verified=verified, model_label="tiny GPT-2",
                        metric_label="logit difference", prompts=3, prompt_labels=["a", "b", "c"])
    figures = sorted(p.name for p in tmp_path.glob("report_*.png"))
    assert figures == sorted(f"report_{k}.png" for k in NODES)

    done = chromium("--dump-dom", page.as_uri(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Dom(done.stdout)

    headings = [dom.text.get(i, "").strip() for i in dom.find("h2", "node-type")]
    assert headings == NODES
    (top_table,) = dom.find("table", "top-nodes")
    first_type_table = dom.find("table", "type-top")[0]
    top_rows = [i for i in dom.find("tr", "node-row") if top_table < i < first_type_table]
    assert len(top_rows) == len(verified) == 5
    cells = [dom.text.get(i, "") for i, (t, _) in enumerate(dom.tags) if t == "td"]
    for node, effect in zip(verified["node"], verified["effect"]):
        assert node in cells and f"{effect:.4g}" in cells

    images = [a for t, a in dom.tags if t == "img"]
    assert len(images) == len(NODES)
    for name, img in zip(NODES, images):
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]) == (tmp_path / f"report_{name}.png").read_bytes()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", done.stdout), "the page must not fetch anything"
    assert external_urls(page.read_text()) == []

    tokens = [a for t, a in dom.tags if t == "span" and "tok" in a.get("class", "").split()]
    assert len(tokens) == 6 + 4 + 5  # real tokens of the three pairs, BOS included
    shown = torch.tensor([float(a["data-score"]) for a in tokens], dtype=torch.float64)
    expected = torch.cat([token_scores(result, i)[result.engine.pairs.mask[i].cpu()] for i in range(3)])
    torch.testing.assert_close(shown, expected, rtol=1e-5, atol=1e-9)
    assert sum("differs" in a["class"].split() for a in tokens) == 3  # one changed token per pair

    shot = tmp_path / "report.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
