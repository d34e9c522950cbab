"""``atp circuit`` (atp_plugin/commands/circuit.py) on the bundled IOI model: the printed
faithfulness and files (CSV, JSON, SVG, the HTML report) against the library computed
independently; bad arguments."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from atp_plugin.commands import circuit as command
from atp_plugin.commands.usage import UsageError, demo_task
from atp_plugin.edges import attribute_edges, faithfulness, faithfulness_curve, top_circuit
from html_report import svgs, tables


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_circuit_command_on_the_demo_model(tmp_path, capsys):
    svg, csv, js, page = tmp_path / "c.svg", tmp_path / "c.csv", tmp_path / "c.json", tmp_path / "c.html"
    assert command.run(parse(["--n-pairs", "4", "--size", "25", "--curve", "--svg", str(svg), "--out-csv", str(csv),
                              "--out-json", str(js), "--report", str(page), "--verify", "3", "--quiet"])) == 0
    out = capsys.readouterr().out
    model, task, metric = demo_task(4, 0)
    result = attribute_edges(model, task.clean, task.corrupt, metric)
    circuit = top_circuit(result, 25)
    f = faithfulness(model, task.clean, task.corrupt, metric, circuit)
    assert f"circuit: {circuit.n_edges} edges (top 25, dangling edges pruned); faithfulness {f:.4f}" in out
    curve = faithfulness_curve(result)
    assert f"CPR (area under the curve) {curve.cpr:.4f}; CMD (area between it and 1) {curve.cmd:.4f}" in out
    saved = json.loads(js.read_text())
    assert saved["faithfulness"] == pytest.approx(f, rel=1e-12)
    assert sorted(e["edge"] for e in saved["circuit"]) == sorted(circuit.edges())
    table = pd.read_csv(csv)
    assert len(table) == result.graph.n_edges and int(table["in_circuit"].sum()) == circuit.n_edges
    root = ET.fromstring(svg.read_text())  # well-formed, self-contained: no external references
    assert root.tag.endswith("svg") and "href" not in svg.read_text()
    titles = [t.text.split(":")[0] for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert set(titles) == set(circuit.edges())
    # the report: the same circuit, faithfulness, curve and verified edges (its numbers are checked
    # against independent computations in test_circuit_report.py)
    text = page.read_text()
    found = tables(text)
    assert float(dict(found["summary"])["faithfulness"]) == pytest.approx(f, rel=5.001e-4)
    assert float(dict(found["curve-summary"])["CPR (area under the curve)"]) == pytest.approx(curve.cpr, rel=5.001e-4)
    assert [row[0] for row in found["top-edges"][1:]] == result.top(3)["edge"].tolist()
    pictured = {p.get("data-edge") for p in svgs(text)["circuit"].iter("{http://www.w3.org/2000/svg}path")}
    assert pictured == set(circuit.edges())
    assert "wrote " + str(page) in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "-1"], "--size must be at least 0"),
    (["--n-pairs", "0"], "--n-pairs must be at least 1"),
    (["--model", "gpt2"], "--pairs FILE is required"),
    (["--report", "/nonexistent-dir/c.html"], "--report /nonexistent-dir/c.html: the directory"),
    (["--keep", "-1"], "--keep must be at least 0"),
    (["--transcoder", "/nonexistent-dir"], "--transcoder /nonexistent-dir: not a directory holding a saved SAE"),
    (["--features", "--model", "gpt2", "--pairs", "p.jsonl"], "--features names the bundled demo transcoders"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UsageError, match=message):
        command.run(parse(argv))


def test_demo_circuit(tmp_path, monkeypatch, capsys):
    from atp_plugin import cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--circuit", "--pairs", "4"]) == 0
    out = capsys.readouterr().out
    model, task, metric = demo_task(4, 0)
    result = attribute_edges(model, task.clean, task.corrupt, metric)
    f = faithfulness(model, task.clean, task.corrupt, metric, top_circuit(result, 40))
    assert f"faithfulness {f:.4f}" in out and "CPR (area under the curve)" in out
    assert ET.fromstring((tmp_path / command.DEMO_SVG).read_text()).tag.endswith("svg")
    found = tables((tmp_path / command.DEMO_REPORT).read_text())
    assert float(dict(found["summary"])["faithfulness"]) == pytest.approx(f, rel=5.001e-4)
    assert len(found["top-edges"]) == 1 + 10 and len(found["curve-points"]) == 1 + 10  # header + rows


def test_per_position_circuit(capsys):
    assert command.run(parse(["--n-pairs", "3", "--size", "30", "--per-position", "--quiet"])) == 0
    out = capsys.readouterr().out
    model, task, metric = demo_task(3, 0)
    result = attribute_edges(model, task.clean, task.corrupt, metric, per_position=True)
    circuit = top_circuit(result, 30)
    assert circuit.per_position
    f = faithfulness(model, task.clean, task.corrupt, metric, circuit)
    assert f"circuit: {circuit.n_edges} edges (top 30, dangling edges pruned); faithfulness {f:.4f}" in out
    assert " pos " in out.splitlines()[2]


def naive_top_tokens(model, tokens, tc, feature: int, k: int = 3) -> str:
    """The ``k`` distinct tokens at which a transcoder feature is most active, from the model's own hooks."""
    _, cache = model.run_with_cache(tokens, names_filter=[tc.hook_name])
    f = tc.encode(cache[tc.hook_name])[..., feature].flatten()
    words: list[str] = []
    for at in f.argsort(descending=True).tolist():
        if float(f[at]) <= 0 or len(words) == k:
            break
        word = model.tokenizer.decode([int(tokens.flatten()[at])]).strip()
        if word not in words:
            words.append(word)
    return ", ".join(words)


def test_feature_circuit_of_the_bundled_transcoders(tmp_path, capsys):
    """``--features`` (the four bundled transcoders) and ``--transcoder DIR``: the printed circuit
    and faithfulness equal the library's; the picture labels each feature with its top tokens."""
    from importlib.resources import files

    from atp_plugin.adapters import TranscoderFeatures
    from atp_plugin.demo_task import load_demo_transcoders
    from atp_plugin.edges import faithfulness_of
    svg = tmp_path / "f.svg"
    assert command.run(parse(["--n-pairs", "4", "--features", "--keep", "5", "--size", "60", "--svg", str(svg),
                              "--quiet"])) == 0
    out = capsys.readouterr().out
    model, task, metric = demo_task(4, 0)
    transcoders = load_demo_transcoders()
    result = attribute_edges(model, task.clean, task.corrupt, metric,
                             features=[TranscoderFeatures(tc) for tc in transcoders], keep=5)
    circuit = top_circuit(result, 60)
    f = faithfulness_of(result, [circuit])[0]
    assert f"{result.graph.n_edges} edges scored" in out
    assert f"circuit: {circuit.n_edges} edges (top 60, dangling edges pruned); faithfulness {f:.4f}" in out
    root = ET.fromstring(svg.read_text())
    tokens = model.to_tokens(task.clean)
    labelled = 0
    for node in root.iter("{http://www.w3.org/2000/svg}g"):
        name = node.get("data-node", "")
        if ".f" in name:
            layer, feature = int(name[3]), int(name.split(".f")[1])
            note = node.find("{http://www.w3.org/2000/svg}title").text.split(": ", 1)[1]
            assert note == naive_top_tokens(model, tokens, transcoders[layer], feature)
            labelled += 1
    assert labelled > 0
    layer1 = files("atp_plugin") / "data" / "transcoders" / "layer1"
    assert command.run(parse(["--n-pairs", "4", "--transcoder", str(layer1), "--keep", "3", "--quiet"])) == 0
    one = attribute_edges(model, task.clean, task.corrupt, metric, features=[TranscoderFeatures(transcoders[1])],
                          keep=3)
    assert f"{one.graph.n_edges} edges scored" in capsys.readouterr().out
    assert {s.name for s in one.graph.senders if s.layer == 1 and s.kind != "head"} >= {"mlp1.error", "mlp1.rest"}


def test_demo_features(tmp_path, monkeypatch, capsys):
    from atp_plugin import cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--features", "--pairs", "4"]) == 0
    out = capsys.readouterr().out
    assert "faithfulness" in out and "left out of the graph" in out and "top 10 edges by exact" in out
    assert ET.fromstring((tmp_path / command.FEATURES_SVG).read_text()).tag.endswith("svg")
    assert (tmp_path / command.FEATURES_REPORT).is_file()
