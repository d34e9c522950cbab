"""``atp demo``: the printed table is ``attribute()`` + ``verify()`` on the held-out pairs it names
(both checked elsewhere against hand-written patches), the heatmap is written, and a bad argument
is exit code 2 with one line naming it, before the model loads and with nothing written."""

from __future__ import annotations

import re

import pytest

from atp_plugin import attribute, cli, metrics
from atp_plugin.demo_task import ioi_pairs, load_demo_model
from conftest import usage_error

_ROW = re.compile(r"^\s*(attn_z|mlp_neurons) (L\d+ @\d+ [HN]\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def test_demo_prints_the_verified_top_nodes_and_writes_the_heatmap(tmp_path, capsys):
    heatmap = tmp_path / "heads.png"
    assert cli.main(["demo", "--pairs", "4", "--top", "3", "--seed", "5", "--heatmap", str(heatmap)]) == 0
    out = capsys.readouterr().out
    rows = [m.groups() for m in map(_ROW.match, out.splitlines()) if m]
    assert len(rows) == 3, out
    assert heatmap.read_bytes().startswith(b"\x89PNG")

    model, task = load_demo_model(), ioi_pairs(4, seed=5, split="test")
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    expected = attribute(model, task.clean, task.corrupt, metric, nodes=["attn_z", "mlp_neurons"]).verify(3)
    assert [f"{t} {n}" for t, n, *_ in rows] == expected["node"].tolist()
    for (_, _, estimate, mean_abs, mean), row in zip(rows, expected.itertuples()):
        for printed, value in ((estimate, row.estimate), (mean_abs, row.mean_abs_effect), (mean, row.effect)):
            assert float(printed) == pytest.approx(value, abs=6e-5), out


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], r"unknown method\(s\) \['nope'\] in --method; known: .*atp\*"),
    (["--top", "0"], r"--top must be at least 1, got 0"),
    (["--pairs", "0"], r"--pairs must be at least 1, got 0"),
    (["--pairs", "200000"], r"--pairs 200000: the test split holds 121,420 distinct pairs"),
    (["--heatmap", "no/such/dir/h.png"], r"--heatmap no/such/dir/h\.png: the directory .* does not exist"),
    (["--heatmap", "."], r"--heatmap \.: is a directory; give a file name"),
])
def test_a_bad_argument_is_exit_2_with_a_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    err = usage_error(capsys, ["demo", *argv])
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # nothing written
