"""Find the circuit of a behaviour: score every edge (EAP by default), keep the top edges (or those
above a threshold), prune dangling ones and measure the circuit's faithfulness by exact patching.

  atp circuit                                      # the bundled IOI model on 32 held-out pairs
  atp circuit --method atp+qk --size 60 --verify 10 --report circuit.html
  atp circuit --model ./my-hf-model --pairs pairs.jsonl --threshold 0.05 --out-csv edges.csv

The behaviour is logit(answer) - logit(wrong) at each clean prompt's last token. Faithfulness is
(L(circuit) - L(corrupt)) / (L(clean) - L(corrupt)) with every edge outside the circuit fed its
sender's corrupt value; --curve adds MIB's curve over circuit sizes and its CPR / CMD. --report
writes one self-contained HTML file: the circuit drawn as a graph, the curve with CPR / CMD, the top
edges (with their exact effects under --verify).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import metrics, plugins
from ..edges import (
    Circuit,
    attribute_edges,
    faithfulness_curve,
    faithfulness_of,
    threshold_circuit,
    top_circuit,
)
from ..edges.svg import write_circuit_svg
from ..report import write_circuit_report
from .usage import UsageError, check_at_least, check_output, demo_task

DEMO_SVG, DEMO_REPORT = "atp_demo_circuit.svg", "atp_demo_circuit.html"
FEATURES_SVG, FEATURES_REPORT = "atp_demo_features.svg", "atp_demo_features.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="'demo' (default), a local Hugging Face model directory, or a "
                                                        "TransformerLens model name")
    parser.add_argument("--pairs", metavar="FILE", help="JSONL (one object per line), JSON array or CSV file with the "
                                                        "fields clean, corrupt, answer, wrong, as atp rank reads it "
                                                        "(without it, --model demo: held-out IOI pairs)")
    parser.add_argument("--n-pairs", type=int, default=32, help="held-out IOI pairs with --model demo (default 32)")
    parser.add_argument("--method", default="atp",
                        help="a registered edge method: atp (default, i.e. EAP), atp+qk, ig, ap, or a plugin's")
    parser.add_argument("--ig-steps", type=int, default=10, help="gradient points for --method ig (default 10)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, default=40, help="keep the top N edges, then prune (default 40)")
    size.add_argument("--threshold", type=float, help="keep every edge scoring at least this, then prune")
    parser.add_argument("--per-position", action="store_true",
                        help="score and keep each edge at each position (default: each edge at every position)")
    parser.add_argument("--curve", action="store_true", help="also the faithfulness curve over MIB's circuit sizes")
    parser.add_argument("--verify", type=int, default=0, metavar="K", help="exactly patch the top K edges one by one")
    parser.add_argument("--svg", metavar="PATH", help="write the circuit as a self-contained SVG picture")
    parser.add_argument("--report", metavar="PATH",
                        help="write a self-contained HTML report: the circuit drawn, the faithfulness curve "
                             "(computed for it) with CPR and CMD, the top edges (verified under --verify)")
    parser.add_argument("--out-csv", metavar="PATH", help="write every edge's score (and whether it is kept) as CSV")
    parser.add_argument("--out-json", metavar="PATH",
                        help="write the circuit, its faithfulness and the settings as JSON")
    parser.add_argument("--sae", action="append", default=[], metavar="DIR",
                        help="an SAE saved in SAE-Lens's format (cfg.json with metadata.hook_name, weights) on a "
                             "blocks.L.hook_mlp_out or hook_attn_out: its features become edge nodes (repeatable)")
    parser.add_argument("--transcoder", action="append", default=[], metavar="DIR",
                        help="a transcoder into blocks.L.hook_mlp_out (SAE-Lens's format, or the format of the "
                             "bundled demo transcoders): its features become edge nodes (repeatable)")
    parser.add_argument("--features", action="store_true",
                        help="with --model demo: the bundled transcoders of the demo model's four MLPs")
    parser.add_argument("--keep", type=int, default=20,
                        help="features kept per SAE/transcoder, the top by node AtP (default 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward/backward pass (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out IOI pairs with --model demo (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    check_at_least(1, n_pairs=args.n_pairs, ig_steps=args.ig_steps, batch_size=args.batch_size)
    check_at_least(0, verify=args.verify, size=args.size, keep=args.keep)
    if args.features and args.model != "demo":
        raise UsageError("--features names the bundled demo transcoders; with another model give --sae / --transcoder")
    for option, paths in (("--sae", args.sae), ("--transcoder", args.transcoder)):
        for path in paths:
            if not Path(path, "cfg.json").is_file():
                raise UsageError(f"{option} {path}: not a directory holding a saved SAE (cfg.json and its weights)")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UsageError(f"--threshold must be a finite number (an edge score), got {args.threshold}")
    if args.method not in plugins.edge_methods():
        known = ", ".join(plugins.edge_methods())
        raise UsageError(f"--method {args.method}: not an edge method; known: {known}")
    for option, path in (("--svg", args.svg), ("--report", args.report), ("--out-csv", args.out_csv),
                         ("--out-json", args.out_json)):
        check_output(option, path)
    model, clean, corrupt, metric, label = _task(args)
    features = dictionaries(args, model)
    start = time.perf_counter()
    result = attribute_edges(model, clean, corrupt, metric, method=args.method, ig_steps=args.ig_steps,
                             per_position=args.per_position, batch_size=args.batch_size,
                             progress=False if args.quiet else None, features=features, keep=args.keep)
    scored = time.perf_counter() - start
    circuit = (threshold_circuit(result, args.threshold) if args.threshold is not None
               else top_circuit(result, args.size))
    report(result, circuit, label, scored, args, notes=_notes(result, model, clean) if features else None)
    return 0


def dictionaries(args: argparse.Namespace, model: Any) -> list[Any]:
    """The SAE / transcoder adapters ``--sae``, ``--transcoder`` and ``--features`` ask for."""
    if not (args.features or args.sae or args.transcoder):
        return []
    from ..adapters import SAEFeatures, TranscoderFeatures
    from ..saes import load_dictionary
    out: list[Any] = []
    if args.features:
        from ..demo_task import load_demo_transcoders
        out += [TranscoderFeatures(tc) for tc in load_demo_transcoders(dtype=_dtype(model))]
    for paths, wrap in ((args.sae, SAEFeatures), (args.transcoder, TranscoderFeatures)):
        out += [wrap(load_dictionary(path, dtype=_dtype(model))) for path in paths]
    return out


def _dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _notes(result, model: Any, clean) -> dict[str, str]:
    """Each kept feature's most activating tokens among the clean prompts, for the picture."""
    from ..edges import activating_tokens
    tokens = clean if isinstance(clean, torch.Tensor) else model.to_tokens(list(clean))
    return activating_tokens(result, tokens, lambda i: model.tokenizer.decode([i]))


def _task(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """Model, clean and corrupt prompts, metric and a label for the header line."""
    if args.model == "demo" and not args.pairs:
        model, task, metric = demo_task(args.n_pairs, args.seed)
        return model, task.clean, task.corrupt, metric, f"bundled IOI demo model, {args.n_pairs} held-out pairs"
    if not args.pairs:
        raise UsageError("--pairs FILE is required with a model other than the demo")
    from .rank import _answer_ids, load_model, read_pairs
    pairs = read_pairs(Path(args.pairs), stream=False)  # edge attribution takes lists
    model, label = load_model(args.model, "cuda" if torch.cuda.is_available() else "cpu", torch.float32, args.quiet)
    answers, wrongs = _answer_ids(model, pairs)
    return (model, [p.clean for p in pairs], [p.corrupt for p in pairs], metrics.logit_diff(answers, wrongs),
            f"{label}, {len(pairs)} pair(s)")


def report(result, circuit: Circuit, label: str, scored: float, args: argparse.Namespace,
           notes: dict[str, str] | None = None) -> None:
    """Print the circuit, its faithfulness (and curve), and write the files asked for (``notes``:
    text under nodes of the picture)."""
    f = faithfulness_of(result, [circuit])[0]
    kept = circuit.keep.reshape(-1).nonzero().flatten()  # rows of to_frame(): edge-major, then position
    frame = result.to_frame().iloc[kept.numpy()].sort_values("score", ascending=False, kind="stable")
    shown = ["edge", "pos", "score", "signed"] if result.per_position else ["edge", "score", "signed"]
    print(f"atp circuit: {label}; method {result.method}; {result.graph.n_edges} edges scored in {scored:.2f}s "
          f"({result.forward_passes} forward, {result.backward_passes} backward passes of one prompt)")
    how = f"top {args.size}" if args.threshold is None else f"score >= {args.threshold:g}"
    if circuit.n_edges:
        print(f"circuit: {circuit.n_edges} edges ({how}, dangling edges pruned); faithfulness {f:.4f} "
              "(1 = the full model, 0 = the corrupt run)")
        print(frame[shown].head(30).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    else:
        print(f"circuit: empty: {_why_empty(result, args)}; its faithfulness is 0 (it is the corrupt run)")
    if circuit.n_edges > 30:
        print(f"... {circuit.n_edges - 30} more edges in the circuit")
    out: dict[str, Any] = {"model": label, "method": result.method, "edges_scored": result.graph.n_edges,
                           "circuit": frame[shown[:-2]].to_dict(orient="records"), "faithfulness": f}
    curve = faithfulness_curve(result) if args.curve or args.report else None
    if curve is not None:
        print("faithfulness curve (MIB sizes): " + ", ".join(
            f"{p:g}:{v:.3f}" for p, v in zip(curve.percentages, curve.faithfulness)))
        print(f"CPR (area under the curve) {curve.cpr:.4f}; CMD (area between it and 1) {curve.cmd:.4f}")
        out["curve"] = {"percentages": curve.percentages, "sizes": curve.sizes, "faithfulness": curve.faithfulness,
                        "cpr": curve.cpr, "cmd": curve.cmd}
    checked = None
    if args.verify:
        checked = result.verify(args.verify)
        passes = checked.attrs["forward_passes"]
        print(f"top {len(checked)} edges by exact single-edge patching ({passes} forward passes):")
        print(checked[["edge", "estimate", "effect", "mean_abs_effect"]].to_string(
            index=False, float_format=lambda v: f"{v:.4f}"))
        out["verified"] = checked[["edge", "estimate", "effect", "mean_abs_effect"]].to_dict(orient="records")
    if args.svg:
        write_circuit_svg(circuit, result.scores, args.svg, f"{label}: {circuit.n_edges} edges, faithfulness {f:.3f}",
                          notes)
        print(f"wrote {args.svg}")
    if args.report:
        write_circuit_report(result, circuit, args.report, curve=curve, verified=checked, faithfulness=f,
                             model_label=label, metric_label="logit(answer) - logit(wrong) at the last token",
                             circuit_label=f"{how}, dangling edges pruned", notes=notes)
        print(f"wrote {args.report}")
    if args.out_csv:
        table = result.to_frame()
        table["in_circuit"] = circuit.keep.reshape(-1).numpy()
        table.to_csv(args.out_csv, index=False)
        print(f"wrote {args.out_csv}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out_json}")


def _why_empty(result, args: argparse.Namespace) -> str:
    """Why the circuit chosen by ``--size`` or ``--threshold`` kept no edge."""
    if args.threshold is None and args.size == 0:
        return "--size 0 keeps no edge"
    if args.threshold is not None and float(result.scores.max()) < args.threshold:
        return f"no edge scores at least {args.threshold:g} (the highest score is {float(result.scores.max()):.4g})"
    return ("pruning removed every edge kept: none lies on a path from the embedding to the logits; "
            "keep more edges (--size) or lower --threshold")


def demo(args: argparse.Namespace) -> int:
    """``atp demo --circuit``: the IOI circuit of the bundled model (EAP, the top 40 edges pruned),
    its faithfulness and curve, the top 10 edges verified, its picture in ``atp_demo_circuit.svg``
    and the whole report in ``atp_demo_circuit.html``."""
    model, task, metric = demo_task(args.pairs, args.seed)
    start = time.perf_counter()
    result = attribute_edges(model, task.clean, task.corrupt, metric, method="atp")
    scored = time.perf_counter() - start
    settings = argparse.Namespace(size=40, threshold=None, curve=True, verify=10, svg=DEMO_SVG, report=DEMO_REPORT,
                                  out_csv=None, out_json=None)
    report(result, top_circuit(result, settings.size), f"bundled IOI demo model, {args.pairs} held-out pairs",
           scored, settings)
    return 0


def demo_features(args: argparse.Namespace) -> int:
    """``atp demo --features``: the IOI feature circuit of the bundled model with its four bundled
    transcoders (20 features kept per MLP by node AtP), EAP, the top 200 edges pruned, its
    faithfulness and curve, what the kept features left out, the top 10 edges verified, its picture
    (features labelled with the demo tokens they fire on most) and report."""
    model, task, metric = demo_task(args.pairs, args.seed)
    from ..adapters import TranscoderFeatures
    from ..demo_task import load_demo_transcoders
    from ..edges import left_out
    features = [TranscoderFeatures(tc) for tc in load_demo_transcoders()]
    start = time.perf_counter()
    result = attribute_edges(model, task.clean, task.corrupt, metric, method="atp", features=features, keep=20)
    scored = time.perf_counter() - start
    settings = argparse.Namespace(size=200, threshold=None, curve=True, verify=10, svg=FEATURES_SVG,
                                  report=FEATURES_REPORT, out_csv=None, out_json=None)
    label = f"bundled IOI demo model and its 4 transcoders (20 features kept each), {args.pairs} held-out pairs"
    report(result, top_circuit(result, settings.size), label, scored, settings,
           notes=_notes(result, model, task.clean))
    print("left out of the graph (every feature not kept, patched for every reader; fraction of L(corrupt) - "
          "L(clean)):")
    print(left_out(result).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0

