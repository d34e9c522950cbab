"""Stream benchmark: peak memory and time of ``attribute()`` over a JSONL file of N pairs read as a
``PairStream``, against the same pairs given as lists, on the bundled demo model.

Pairs: ``ioi_pairs(N)`` of the demo task (test split), written as JSONL lines with ``clean``,
``corrupt`` and ``label`` = [answer id, wrong id]; metric ``metrics.logit_diff_labels()`` for the
stream and ``metrics.logit_diff`` for the lists; nodes attn_z and mlp_neurons; batches of 64 pairs.
Every figure comes from a fresh subprocess (this script with ``--child``) that loads the model,
runs ``attribute()`` once on 64 pairs (one-time costs), resets its peak (``/proc/self/clear_refs``)
and then runs the measured call: "added" is that call's peak (VmHWM) minus the resident memory
it started from, so the interpreter, torch and the model are not counted. For "lists" the child
reads the file into lists first (inside the measured part: holding the pairs is the point).

Usage:
  python benchmarks/bench_stream.py [--pairs 1000 10000 100000] [--method atp] [--threads 1]
      [--out docs/benchmark_stream.md]
With ``--out``, the command, date and table replace the part of the file between
``<!-- bench_stream -->`` and ``<!-- /bench_stream -->`` (appended if absent).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import atp_plugin
from atp_plugin import PairStream, metrics
from atp_plugin.demo_task import ioi_pairs, load_demo_model
from timing import peak_kb, status_kb, write_section  # this script's folder is on sys.path

NODES = ["attn_z", "mlp_neurons"]
BATCH = 64
WARMUP = 64


def write_pairs(path: Path, n: int) -> None:
    """``n`` demo-task pairs as JSONL with [answer id, wrong id] labels."""
    model = load_demo_model()
    pairs = ioi_pairs(n)
    answers = metrics.token_ids(model, sorted(set(pairs.answers) | set(pairs.wrongs)))
    ids = dict(zip(sorted(set(pairs.answers) | set(pairs.wrongs)), answers.tolist()))
    with path.open("w") as f:
        for c, k, a, w in zip(pairs.clean, pairs.corrupt, pairs.answers, pairs.wrongs):
            f.write(json.dumps({"clean": c, "corrupt": k, "label": [ids[a], ids[w]]}) + "\n")


def run(model, path: Path, mode: str, method: str, limit: int | None = None):
    """``attribute()`` over the pairs of ``path`` (the first ``limit``), streamed or as lists."""
    if mode == "stream":
        lines = (lambda: (json.loads(line) for _, line in zip(range(limit), path.open()))) if limit else None
        stream = PairStream(lines) if lines else PairStream.jsonl(path)
        return atp_plugin.attribute(model, stream, metric=metrics.logit_diff_labels(), nodes=NODES, method=method,
                                    batch_size=BATCH, progress=False)
    records = [json.loads(line) for _, line in zip(range(limit or sys.maxsize), path.open())]
    labels = torch.tensor([r["label"] for r in records])
    return atp_plugin.attribute(model, [r["clean"] for r in records], [r["corrupt"] for r in records],
                                metrics.logit_diff(labels[:, 0], labels[:, 1]), nodes=NODES, method=method,
                                batch_size=BATCH, progress=False)


def child(path: Path, mode: str, method: str) -> dict[str, float]:
    torch.set_grad_enabled(True)
    model = load_demo_model()
    run(model, path, mode, method, limit=WARMUP)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
    start_kb = status_kb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(model, path, mode, method)
    return {"wall": time.perf_counter() - wall, "seconds": time.process_time() - cpu,
            "added_kb": peak_kb() - start_kb, "n_pairs": result.n_pairs}


def spawn(path: Path, mode: str, method: str, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(path), mode, "--method", method, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--method", default="atp")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, help="write the table as markdown to this file")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.method)))
        return
    rows = ["| pairs | stream: added peak (MB) | stream: time (s) | lists: added peak (MB) | lists: time (s) |",
            "|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.pairs:
            path = Path(tmp) / f"pairs{n}.jsonl"
            write_pairs(path, n)
            got = {mode: spawn(path, mode, args.method, args.threads) for mode in ("stream", "lists")}
            assert all(g["n_pairs"] == n for g in got.values())
            rows.append(f"| {n:,} | " + " | ".join(f"{got[m]['added_kb'] / 1024:.1f} | {got[m]['wall']:.1f}"
                                                    for m in ("stream", "lists")) + " |")
            print(rows[-1], flush=True)
    command = "python benchmarks/bench_stream.py " + shlex.join(sys.argv[1:])
    text = "\n".join([f"`{command}` on {datetime.date.today()}, method {args.method}, nodes {', '.join(NODES)}, "
                      f"batches of {BATCH} pairs, {args.threads} torch thread(s), CPU; "
                      "added peak = VmHWM of the call minus the resident memory it started from.", "", *rows])
    print(text)
    if args.out:
        write_section(args.out, "bench_stream", text)


if __name__ == "__main__":
    main()
