"""The demo model exported as a Hugging Face GPT-2 directory computes the demo model's logits (up to
the dropped unembedding bias), and ``atp rank`` on that directory gives ``--model demo``'s numbers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from atp_plugin import cli
from atp_plugin.demo_hf import save_demo_as_hf
from atp_plugin.demo_task import ioi_pairs, load_demo_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_demo_as_hf(tmp_path_factory.mktemp("demo-hf"), dtype=torch.float64)


def test_the_export_computes_the_demo_models_logits(exported):
    demo = load_demo_model(dtype=torch.float64)
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported, dtype=torch.float64).eval()
    task = ioi_pairs(8, seed=3, split="test")
    tokens = demo.to_tokens(task.clean + task.corrupt)  # [16, T]
    with torch.no_grad():
        expected = demo(tokens) - demo.b_U  # [16, T, d_vocab]
        got = hf(tokens).logits
    assert demo.b_U.abs().max() > 0  # the bias really is dropped: the comparison must subtract it
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


def test_rank_on_the_export_gives_the_demo_models_numbers(exported, tmp_path):
    task = ioi_pairs(4, seed=5, split="test")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"clean": c, "corrupt": x, "answer": a, "wrong": w}) + "\n"
                             for c, x, a, w in zip(task.clean, task.corrupt, task.answers, task.wrongs)))
    tables = {}
    for spec in ("demo", str(exported)):
        out = tmp_path / f"{len(tables)}.json"
        assert cli.main(["rank", "--model", spec, "--pairs", str(pairs), "--dtype", "float64", "--method", "atp+qk",
                         "--nodes", "attn_z,attn_q", "--top-k", "15", "--verify", "3", "--out-json", str(out),
                         "--quiet"]) == 0
        tables[spec] = json.loads(out.read_text())["ranked"]
    demo, bridge = tables.values()
    assert [r["node"] for r in demo] == [r["node"] for r in bridge]
    for key in ("score", "signed", "effect"):
        a = torch.tensor([r[key] for r in demo if r.get(key) is not None and r[key] == r[key]], dtype=torch.float64)
        b = torch.tensor([r[key] for r in bridge if r.get(key) is not None and r[key] == r[key]], dtype=torch.float64)
        assert len(a) == len(b) > 0
        # the Bridge's compatibility-mode weight processing agrees with the unprocessed model to ~1e-7
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
