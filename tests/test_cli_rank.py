"""``atp rank``: the numbers it writes are attribute()'s and verify()'s (checked here against the
API and a hand-written patch), every input format gives the same ranking, and every bad argument
or malformed file is exit code 2 with a message naming what is wrong."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
import torch

import atp_plugin
from atp_plugin import attribute, cli, metrics
from conftest import HAS_HOOKED, usage_error
from hf_models import load_bridge, load_hooked, save_gpt2

PAIRS = [  # token ids: "w{i}" is i + 2
    {"clean": "w1 w2 w3 w4", "corrupt": "w1 w5 w3 w4", "answer": "w6", "wrong": "w7"},
    {"clean": "w8 w9 w10", "corrupt": "w8 w11 w10", "answer": "w12", "wrong": "w13"},
    {"clean": "w14 w15 w16 w17 w18", "corrupt": "w14 w15 w19 w17 w18", "answer": "w20", "wrong": "w21"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


ONE = ["--clean", "w1 w2", "--corrupt", "w1 w3", "--answer", "w4", "--wrong", "w5"]
ONE_PAIR = ["--clean", "w1 w2 w3 w4", "--corrupt", "w1 w5 w3 w4", "--answer", "w6", "--wrong", "w7"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows, fields=("clean", "corrupt", "answer", "wrong")):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rank(*argv) -> int:
    return cli.main(["rank", *map(str, argv)])


def test_files_hold_attribute_and_verify_numbers(model_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out_csv, out_json = tmp_path / "ranks.csv", tmp_path / "ranks.json"
    assert rank("--model", model_dir, "--pairs", pairs, "--dtype", "float64", "--nodes", "attn_z,attn_q,mlp_neurons",
                "--method", "atp+qk", "--top-k", 0, "--verify", 4, "--out-csv", out_csv, "--out-json", out_json,
                "--quiet") == 0
    printed = capsys.readouterr().out

    model = load_bridge(model_dir)
    ids = lambda key: [int(r[key][1:]) + 2 for r in PAIRS]  # noqa: E731
    result = attribute(model, [r["clean"] for r in PAIRS], [r["corrupt"] for r in PAIRS],
                       metrics.logit_diff(ids("answer"), ids("wrong")), nodes=["attn_z", "attn_q", "mlp_neurons"],
                       method="atp+qk")
    expected = result.to_frame()
    expected = expected.sort_values("score", ascending=False, kind="stable")
    table = pd.read_csv(out_csv)
    assert len(table) == len(expected) == 2 * 6 * (4 + 4 + 128)  # 6 positions: no position is padding in every pair
    assert table["node"].tolist() == expected["node"].tolist()
    torch.testing.assert_close(torch.tensor(table["score"].to_numpy()), torch.tensor(expected["score"].to_numpy()),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.tensor(table["signed"].to_numpy()), torch.tensor(expected["signed"].to_numpy()),
                               rtol=1e-10, atol=1e-14)
    verified = result.verify(4)
    assert table["effect"].notna().sum() == 4
    torch.testing.assert_close(torch.tensor(table["effect"].to_numpy()[:4]),
                               torch.tensor(verified["effect"].to_numpy()),
                               rtol=1e-10, atol=1e-14)

    # the top verified effect by hand: patch that one node with run_with_hooks, pair by pair
    top = table.iloc[0]
    kind = {"attn_z": "attn.hook_z", "attn_q": "attn.hook_q", "mlp_neurons": "mlp.hook_post"}[top["node_type"]]
    hook_name = f"blocks.{int(top['layer'])}.{kind}"
    index = int(top["head"]) if top["node_type"] != "mlp_neurons" else int(top["neuron"])
    effects = []
    for r, answer, wrong in zip(PAIRS, ids("answer"), ids("wrong")):
        clean, corrupt = model.to_tokens(r["clean"]), model.to_tokens(r["corrupt"])
        pos = int(top["pos"]) - (6 - clean.shape[1])  # the table's positions are left-padded to 6 tokens
        if pos < 0:
            continue  # padding in this pair: no node there
        _, noise = model.run_with_cache(corrupt)

        def patch(x, hook, pos=pos, noise=noise):
            x = x.clone()
            x[:, pos, index] = noise[hook_name][:, pos, index]
            return x

        def diff(logits, answer=answer, wrong=wrong):
            return (logits[0, -1, answer] - logits[0, -1, wrong]).item()

        effects.append(diff(model.run_with_hooks(clean, fwd_hooks=[(hook_name, patch)])) - diff(model(clean)))
    assert table["effect"].iloc[0] == pytest.approx(sum(effects) / len(effects), rel=1e-9, abs=1e-12)
    assert table["mean_abs_effect"].iloc[0] == pytest.approx(sum(map(abs, effects)) / len(effects), rel=1e-9, abs=1e-12)
    assert table["pairs"].iloc[0] == len(effects)

    document = json.loads(out_json.read_text())
    assert document["method"] == "atp+qk" and document["n_pairs"] == 3 and document["verified"] == 4
    assert [row["node"] for row in document["ranked"]] == table["node"].tolist()
    assert [row["score"] for row in document["ranked"]] == pytest.approx(table["score"].tolist(), rel=1e-12)
    assert document["ranked"][5]["effect"] is None

    lines = printed.splitlines()
    first = ["1", *table["node"].iloc[0].split(), f"{table['score'].iloc[0]:.5f}"]
    assert any(line.split()[:len(first)] == first for line in lines), printed
    assert f"{len(table)} nodes" in printed


def test_every_verified_node_is_shown(model_dir, tmp_path, capsys):
    """--verify 5 with --top-k 3: the table and the CSV hold the 5 verified nodes, not 3."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert rank("--model", model_dir, "--pairs", pairs, "--nodes", "attn_z", "--top-k", 3, "--verify", 5,
                "--out-csv", tmp_path / "r.csv", "--quiet") == 0
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 5 and table["effect"].notna().all()
    assert sum(bool(re.match(r"\s+\d+ attn_z ", line)) for line in capsys.readouterr().out.splitlines()) == 5


def test_verify_above_the_number_of_nodes_says_how_many_were_verified(model_dir, tmp_path, capsys):
    """--verify 100000 on 2 layers x 5 positions x 4 heads: all 40 verified, and the header and the JSON say 40."""
    out = tmp_path / "r.json"
    assert rank("--model", model_dir, "--nodes", "attn_z", *ONE_PAIR, "--verify", 100000, "--out-json", out,
                "--quiet") == 0
    captured = capsys.readouterr()
    assert "top 40 verified by exact patching" in captured.out and "100000" not in captured.out, captured.out
    assert "atp rank: warning:" in captured.err
    document = json.loads(out.read_text())
    assert document["verified"] == 40 and sum(row["effect"] is not None for row in document["ranked"]) == 40


def test_float16(model_dir, tmp_path):
    """--dtype float16 runs the model in half precision: scores near the float64 ones, not equal to them."""
    tables = {}
    for dtype in ("float64", "float16"):
        out = tmp_path / f"{dtype}.json"
        assert rank("--model", model_dir, "--nodes", "attn_z,mlp_neurons", "--pairs",
                    write_jsonl(tmp_path / "p.jsonl", PAIRS), "--dtype", dtype, "--top-k", 0, "--out-json", out,
                    "--quiet") == 0
        document = json.loads(out.read_text())
        assert document["dtype"] == dtype
        tables[dtype] = pd.DataFrame(document["ranked"]).set_index("node")["score"].sort_index()
    half, full = torch.tensor(tables["float16"].to_numpy()), torch.tensor(tables["float64"].to_numpy())
    assert list(tables["float16"].index) == list(tables["float64"].index)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02 * float(full.abs().max()))
    assert not torch.equal(half, full)


def test_command_line_jsonl_and_csv_pairs_give_the_same_table(model_dir, tmp_path):
    given = ["--model", model_dir, "--dtype", "float64", "--nodes", "attn_v", "--quiet", "--top-k", 0]
    for r in PAIRS:
        given += ["--clean", r["clean"], "--corrupt", r["corrupt"], "--answer", r["answer"], "--wrong", r["wrong"]]
    assert rank(*given, "--out-csv", tmp_path / "a.csv") == 0
    base = ["--model", model_dir, "--dtype", "float64", "--nodes", "attn_v", "--quiet", "--top-k", 0]
    assert rank(*base, "--pairs", write_jsonl(tmp_path / "p.jsonl", PAIRS), "--out-csv", tmp_path / "b.csv") == 0
    assert rank(*base, "--pairs", write_csv(tmp_path / "p.csv", PAIRS), "--out-csv", tmp_path / "c.csv") == 0
    (tmp_path / "p.json").write_text(json.dumps(PAIRS, indent=2))  # a pretty-printed JSON array
    assert rank(*base, "--pairs", tmp_path / "p.json", "--out-csv", tmp_path / "e.csv") == 0
    bom = tmp_path / "bom.csv"  # as Excel saves "CSV UTF-8": a byte-order mark before the header
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "p.csv").read_bytes())
    assert rank(*base, "--pairs", bom, "--out-csv", tmp_path / "d.csv") == 0
    a, *others = (pd.read_csv(tmp_path / f"{x}.csv") for x in "abcde")
    for other in others:
        pd.testing.assert_frame_equal(a, other)


def test_the_report_option_writes_the_html_and_figures(model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    assert rank("--model", model_dir, "--pairs", pairs, "--nodes", "attn_z,resid_pre", "--verify", 3, "--quiet",
                "--report", tmp_path / "out.html") == 0
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.html", "out_attn_z.png", "out_resid_pre.png"]
    assert 'src="data:image/png;base64,' in (tmp_path / "out.html").read_text()


BAD_FILES = [
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4", "wrong": "w5"}\n{"clean": "w1",\n',
     r"p\.jsonl line 2: not valid JSON \(.* at column 16\); a JSONL file holds one JSON object per line"),
    ("p.json", '{\n  "clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4", "wrong": "w5"\n}\n',
     r"p\.json line 1: not valid JSON .*one JSON object per line \(or give a JSON array of objects\)"),
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4", "wrong": "w5"}\n\n'
                '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4"}\n',
     r"p\.jsonl line 3: missing field\(s\) \['wrong'\]"),
    ("p.jsonl", '"w1 w2"\n',
     r"p\.jsonl line 1: expected a JSON object with fields clean, corrupt, answer, wrong, got str"),
    ("p.jsonl", '["w1", "w2"]\n', r"p\.jsonl item 1 \(line 1\): expected a JSON object .*, got str"),
    ("p.json", json.dumps([PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "corrupt"}], indent=2),
     r"p\.json item 2 \(line 8\): missing field\(s\) \['corrupt'\]"),
    ("p.json", json.dumps(PAIRS[:2], indent=2)[:-2], r"p\.json line 13: not valid JSON \(Expecting"),
    ("p.txt", "  [" + json.dumps(PAIRS[0]) + ", 3]", r"p\.txt item 2 \(line 1\): expected a JSON object .*, got int"),
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": 4, "wrong": "w5"}\n',
     r"p\.jsonl line 1: field 'answer' must be a string, got int 4"),
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": " ", "wrong": "w5"}\n',
     r"line 1: field 'answer' is empty"),
    ("p.jsonl", "\n\n", r"p\.jsonl: the file holds no pairs"),
    ("p.csv", "clean,corrupt,answer\nw1 w2,w1 w3,w4\n", r"p\.csv line 1: the header lacks column\(s\) \['wrong'\]"),
    ("p.csv", "clean,corrupt,answer,wrong\nw1 w2,w1 w3,w4,w5\nw1 w2,w1 w3,w4\n",
     r"p\.csv line 3: 3 column\(s\), the header has 4 \(a field is missing\)"),
    ("p.csv", "clean,corrupt,answer,wrong\nw1 w2,w1 w3,w4,w5,w6\n",
     r"p\.csv line 2: 5 column\(s\), the header has 4 \(quote fields that contain the delimiter\)"),
    ("p.txt", "whatever\n", r"unknown file type '\.txt'"),
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4 w6", "wrong": "w5"}\n',
     r"p\.jsonl line 1: answer 'w4 w6' is 2 tokens; it must be exactly one token"),
    ("p.jsonl", '{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4", "wrong": "w5"}\n'
                '{"clean": "w1 w2 w3", "corrupt": "w1 w3", "answer": "w4", "wrong": "w5"}\n',
     r"p\.jsonl line 2 is not token-aligned: clean 'w1 w2 w3' has 4 tokens, corrupt 'w1 w3' has 3"),
    ("p.csv", "clean,corrupt,answer,wrong\nw1 w2,w1 w3,w4,w5\nw1 w2 w3,w1 w3,w4,w5\n",
     r"p\.csv line 3: clean has 4 tokens but corrupt has 3; a pair must be token-aligned"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_a_malformed_pairs_file_is_exit_2_naming_the_line(model_dir, tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    assert rank("--model", model_dir, "--pairs", tmp_path / name, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("atp rank: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


BAD_ARGS = [
    (ONE + ["--method", "atp++"], r"unknown method\(s\) \['atp\+\+'\] in --method; known: .*atp\*"),
    (ONE + ["--nodes", "attn_z,heads"], r"unknown node type\(s\) \['heads'\] in --nodes; known: .*attn_z"),
    (ONE + ["--top-k", "-1"], r"--top-k must be at least 0, got -1"),
    (ONE + ["--verify", "-2"], r"--verify must be at least 0, got -2"),
    (ONE + ["--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    (ONE + ["--pairs", "x.jsonl"], r"either with --pairs FILE or with --clean"),
    (ONE + ["--clean", "w6 w7"], r"once per pair each; got 2 --clean, 1 --corrupt, 1 --answer, 1 --wrong"),
    ([], r"no prompt pairs: give --pairs FILE"),
    (["--pairs", "missing.jsonl"], r"--pairs missing\.jsonl: no such file"),
    (ONE + ["--out-csv", "no/such/dir/x.csv"], r"--out-csv no/such/dir/x\.csv: the directory .* does not exist"),
    (ONE + ["--nodes", "resid_pre", "--report", "nodir/r.html"], r"--report nodir/r\.html: the directory"),
    (ONE + ["--device", "foo"], r"--device 'foo' is not a torch device; use e\.g\. cpu"),
    *([] if torch.cuda.is_available()
      else [(ONE + ["--device", "cuda"], r"--device cuda: CUDA is not available here")]),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS)
def test_a_bad_argument_is_exit_2_with_a_message(model_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    err = usage_error(capsys, ["rank", "--model", model_dir, *argv, "--quiet"])
    assert re.search(message, err), err


@pytest.mark.parametrize("option", ["--out-csv", "--out-json", "--report"])
def test_an_output_that_cannot_be_written_is_exit_2_before_any_work(tmp_path, monkeypatch, capsys, option):
    """A directory, a path under a file, or a place where no file can be created: one line naming the
    option, before the model loads (the model named here does not exist) and with nothing printed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("")
    cases = [("outdir", r"outdir: is a directory; give a file name"),
             ("afile/x.out", r"afile/x\.out: the directory .*afile is not a directory")]
    if Path("/sys").is_dir():  # sysfs: even root cannot create files there
        cases.append(("/sys/atp-out.x", r"/sys/atp-out\.x: cannot create files in /sys"))
    for path, message in cases:
        err = usage_error(capsys, ["rank", "--model", tmp_path / "no-model", *ONE, option, path, "--quiet"])
        assert re.search(f"^atp rank: error: {option} {message}", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "outdir"]


def test_a_report_figure_that_cannot_be_written_is_exit_2(tmp_path, monkeypatch, capsys):
    """--report out.html also writes out_<node type>.png: a directory of that name is found before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out_attn_z.png").mkdir()
    err = usage_error(capsys, ["rank", "--model", tmp_path / "no-model", *ONE, "--nodes", "resid_pre,attn_z",
                               "--report", "out.html", "--quiet"])
    assert "--report out_attn_z.png: is a directory" in err, err


def test_a_bad_model_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rank("--model", tmp_path / "empty", *ONE, "--quiet") == 2
    assert "the directory has no config.json" in capsys.readouterr().err
    assert rank("--model", tmp_path / "nothere", *ONE, "--quiet") == 2
    assert "no such directory" in capsys.readouterr().err


def test_argparse_errors_exit_2_from_the_console():
    done = subprocess.run([sys.executable, "-m", "atp_plugin.cli", "rank", "--clean", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "the following arguments are required: --model" in done.stderr


def test_version():
    done = subprocess.run([sys.executable, "-m", "atp_plugin.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"atp-plugin {version('atp-plugin')}", done
    assert version("atp-plugin") == atp_plugin.__version__


@pytest.mark.skipif(not files("atp_plugin").joinpath("data", "model.safetensors").is_file(),
                    reason="the bundled demo model (atp_plugin/data/model.safetensors) is not built in this checkout")
def test_the_demo_model_ranks_ioi_pairs(tmp_path):
    out = tmp_path / "demo.csv"
    assert rank("--model", "demo", "--clean", "When Mary and John went to the store, John gave a drink to",
                "--corrupt", "When Mary and John went to the store, Mary gave a drink to", "--answer", " Mary",
                "--wrong", " John", "--nodes", "attn_z", "--method", "atp+qk", "--verify", 3, "--quiet",
                "--out-csv", out) == 0
    table = pd.read_csv(out)
    assert table["effect"].notna().sum() == 3 and table["score"].is_monotonic_decreasing


@pytest.mark.parametrize("field, text", [("clean", "When Mary and Zed went to the store, Zed gave a drink to"),
                                         ("answer", " Marry")])
def test_a_word_the_demo_model_does_not_know_is_exit_2_naming_it(capsys, field, text):
    """The demo model's word-level tokenizer would turn it into <unk>: refused, with its vocabulary."""
    given = {"clean": "When Mary and John went to the store, John gave a drink to",
             "corrupt": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary",
             "wrong": " John"} | {field: text}
    argv = [x for f, v in given.items() for x in (f"--{f}", v)]
    assert rank("--model", "demo", *argv, "--quiet") == 2
    err = capsys.readouterr().err
    unknown = text.split()[3].strip(",") if field == "clean" else text.strip()
    assert err.startswith("atp rank: error: pair #1 on the command line: ") and len(err.strip().splitlines()) == 1
    assert f"holds word(s) ['{unknown}'] the model's tokenizer does not know" in err and " Mary " in err, err


def test_a_transformer_lens_name_loads_through_from_pretrained(tmp_path):
    """``--model gpt2`` takes HookedTransformer.from_pretrained's real path (TransformerLens 3) or
    TransformerBridge.boot_transformers's (4, which has no HookedTransformer): here it finds a tiny
    GPT-2 saved as the hub cache's "gpt2" (offline), and ranks as that model loaded step by step."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--gpt2"
    snapshot = save_gpt2(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pairs, out = write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "ranks.csv"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "atp_plugin.cli", "rank", "--model", "gpt2", "--pairs", str(pairs),
                           "--dtype", "float64", "--method", "atp+qk", "--nodes", "attn_z,attn_q", "--top-k", "0",
                           "--out-csv", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"gpt2 ({'HookedTransformer' if HAS_HOOKED else 'TransformerBridge'})" in done.stdout

    ids = lambda key: [int(r[key][1:]) + 2 for r in PAIRS]  # noqa: E731
    model = load_hooked(snapshot) if HAS_HOOKED else load_bridge(snapshot)
    result = attribute(model, [r["clean"] for r in PAIRS], [r["corrupt"] for r in PAIRS],
                       metrics.logit_diff(ids("answer"), ids("wrong")), nodes=["attn_z", "attn_q"], method="atp+qk")
    expected = result.to_frame()
    expected = expected.sort_values("score", ascending=False, kind="stable")
    table = pd.read_csv(out)
    assert table["node"].tolist() == expected["node"].tolist()
    torch.testing.assert_close(torch.tensor(table["score"].to_numpy()), torch.tensor(expected["score"].to_numpy()),
                               rtol=1e-10, atol=1e-14)
