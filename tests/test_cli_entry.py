"""The installed ``atp`` command, run as a user runs it (a subprocess of the console script):
``atp circuit`` and ``atp rank`` read the same pair files, bad numbers and offline hub names are
one-line errors with exit code 2, an empty circuit says why, and ``atp --help`` summarizes every
command in whole sentences."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atp_plugin.commands import circuit as command
from atp_plugin.commands.usage import demo_task
from atp_plugin.demo_task import ioi_pairs
from atp_plugin.edges import attribute_edges, faithfulness, top_circuit
from conftest import HAS_HOOKED, usage_error

ATP = Path(sys.executable).with_name("atp")
if not ATP.is_file():  # an interpreter outside the environment that installed the package
    ATP = Path(shutil.which("atp") or ATP)
pytestmark = pytest.mark.skipif(not ATP.is_file(), reason="no atp console script: pip install -e . first")


def atp(*args: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``atp *args`` in ``cwd`` on one torch thread (the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(ATP), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def startup_seconds(cwd: Path) -> float:
    """How long this machine, as loaded now, takes to start Python and import what ``atp circuit`` and
    ``atp rank`` load before touching a model: the baseline the offline checks are timed against."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import transformer_lens, transformers, atp_plugin.cli"], cwd=cwd, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    return time.perf_counter() - start


def one_line_error(done: subprocess.CompletedProcess, command_name: str) -> str:
    """The one stderr line of a usage error (exit code 2, no traceback)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"atp {command_name}: error: ") and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    return done.stderr


def write_ioi_pairs(path: Path, n: int) -> list[dict[str, str]]:
    """``n`` held-out IOI pairs of the demo model in ``path``: JSONL, a JSON array or CSV by its suffix."""
    task = ioi_pairs(n, seed=0, split="test")
    rows = [{"clean": c, "corrupt": k, "answer": a, "wrong": w}
            for c, k, a, w in zip(task.clean, task.corrupt, task.answers, task.wrongs)]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_circuit_reads_the_pair_files_rank_reads(tmp_path, suffix):
    """The example of ``atp circuit --help`` (--pairs pairs.jsonl) and the other formats: the circuit
    and faithfulness of the library on the same pairs; ``atp rank`` takes the same file."""
    pairs = tmp_path / f"pairs{suffix}"
    rows = write_ioi_pairs(pairs, 4)
    out = tmp_path / "c.json"
    done = atp("circuit", "--model", "demo", "--pairs", pairs, "--size", 20, "--out-json", out, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model, task, metric = demo_task(4, 0)  # the same pairs
    assert [r["clean"] for r in rows] == task.clean
    result = attribute_edges(model, task.clean, task.corrupt, metric)
    circuit = top_circuit(result, 20)
    saved = json.loads(out.read_text())
    assert sorted(e["edge"] for e in saved["circuit"]) == sorted(circuit)
    assert saved["faithfulness"] == pytest.approx(faithfulness(model, task.clean, task.corrupt, metric, circuit),
                                                  rel=1e-9)
    if suffix == ".jsonl":
        ranked = atp("rank", "--model", "demo", "--pairs", pairs, "--nodes", "attn_z", "--top-k", 3, "--quiet",
                     cwd=tmp_path)
        assert ranked.returncode == 0 and "4 pair(s)" in ranked.stdout, ranked.stderr


@pytest.mark.parametrize("pairs, message", [
    ("missing.jsonl", "--pairs missing.jsonl: no such file"),
    ("empty.jsonl", "--pairs empty.jsonl: the file holds no pairs"),
    ("bad.jsonl", "bad.jsonl line 2: not valid JSON"),
    ("pairs.txt", "unknown file type '.txt'"),
])
def test_circuit_reports_bad_pair_files_as_rank_does(tmp_path, monkeypatch, capsys, pairs, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"clean": "a", "corrupt": "b", "answer": "c", "wrong": "d"}\n{oops\n')
    (tmp_path / "pairs.txt").write_text("clean,corrupt,answer,wrong\n")
    assert message in one_line_error(atp("circuit", "--model", "demo", "--pairs", pairs, cwd=tmp_path), "circuit")
    monkeypatch.chdir(tmp_path)
    assert message in usage_error(capsys, ["rank", "--model", "demo", "--pairs", pairs])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_threshold_that_is_no_number_is_a_usage_error(tmp_path, value):
    err = one_line_error(atp("circuit", f"--threshold={value}", cwd=tmp_path), "circuit")
    assert f"--threshold must be a finite number (an edge score), got {value}" in err


def test_an_empty_circuit_says_why(tmp_path):
    done = atp("circuit", "--n-pairs", 2, "--size", 0, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "circuit: empty: --size 0 keeps no edge; its faithfulness is 0 (it is the corrupt run)" in done.stdout
    assert "DataFrame" not in done.stdout and "Index" not in done.stdout


def test_an_empty_circuit_by_threshold_names_the_highest_score(capsys):
    from test_cli_circuit import parse
    assert command.run(parse(["--n-pairs", "2", "--threshold", "1e9", "--quiet"])) == 0
    out = capsys.readouterr().out
    assert "circuit: empty: no edge scores at least 1e+09 (the highest score is " in out


@pytest.mark.parametrize("name, offline", [
    ("circuit", {"HF_HUB_OFFLINE": "1"}), ("rank", {"TRANSFORMERS_OFFLINE": "1"}), ("circuit", {}),
], ids=["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "unset"])
def test_a_hub_name_offline_fails_at_once(tmp_path, name, offline):
    """Offline, a hub name not in the cache fails in seconds (the hub client retried for ~30 s).
    Without an offline flag this machine has no network, or the hub answers at once that the repo
    does not exist."""
    pairs = tmp_path / "pairs.jsonl"
    write_ioi_pairs(pairs, 1)
    env = {"HF_HOME": str(tmp_path / "hf"), **offline}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(var, "")
    baseline = startup_seconds(tmp_path)
    start = time.perf_counter()
    done = atp(name, "--model", "nonexistent/name", "--pairs", pairs, "--quiet", cwd=tmp_path, env=env)
    elapsed = time.perf_counter() - start
    err = one_line_error(done, name)
    assert "--model nonexistent/name: could not" in err
    if offline and not HAS_HOOKED:  # TransformerLens 3 knows at once that it is none of its names
        assert f"offline ({next(iter(offline))} is set)" in err
    # the hub client's retries took ~30 s beyond starting up; a loaded machine slows both alike
    assert elapsed < baseline + 12, f"{elapsed:.1f}s, starting up {baseline:.1f}s"


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer's official names (TransformerLens 3)")
def test_an_official_transformerlens_name_offline_fails_at_once(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_ioi_pairs(pairs, 1)
    baseline = startup_seconds(tmp_path)
    start = time.perf_counter()
    done = atp("rank", "--model", "gpt2", "--pairs", pairs, cwd=tmp_path,
               env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert "offline (HF_HUB_OFFLINE is set) and gpt2 is not in the local Hugging Face cache" in one_line_error(done,
                                                                                                                "rank")
    assert time.perf_counter() - start < baseline + 12


def test_help_summarizes_every_command_in_whole_sentences(tmp_path):
    from atp_plugin.cli import COMMANDS
    done = atp("--help", cwd=tmp_path, env={"COLUMNS": "100"})
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name in COMMANDS:
        module = __import__(f"atp_plugin.commands.{COMMANDS[name]}", fromlist=["_"])
        summary = " ".join(module.__doc__.replace("``", "").strip().split("\n\n")[0].split())
        assert summary.endswith(".") and f"{name} {summary}" in text, (name, summary)
    assert "keep the top edges (or those above a threshold), prune dangling ones" in text
