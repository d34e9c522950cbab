"""Rank the components of a model for a behaviour given by prompt pairs (AtP* by default).

The behaviour is logit(answer) - logit(wrong) at each clean prompt's last token; a node's score
says how much patching it with its value on the corrupt prompt changes that.

  atp rank --model demo --clean "When Mary and John went to the store, John gave a drink to" \\
           --corrupt "When Mary and John went to the store, Mary gave a drink to" --answer " Mary" --wrong " John"
  atp rank --model ./my-hf-model --pairs pairs.jsonl --nodes attn_z,mlp_neurons --verify 10 --out-csv ranks.csv
  atp rank --model gpt2 --pairs pairs.csv --report report.html

--model: ``demo`` (the bundled IOI model), a local Hugging Face model directory (loaded as a
TransformerBridge in compatibility mode) or a TransformerLens model name (HookedTransformer,
downloaded from the hub; under TransformerLens 4, which has none, a TransformerBridge). --pairs: a
JSONL file (one JSON object per line; read a line at a time, so memory stays flat however many
pairs it holds), a JSON array of objects (.json, or any file
whose text starts with "[") or a CSV file (header row) with the fields clean, corrupt, answer, wrong.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, overload
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch

from .. import PairStream, attribute, metrics, plugins
from ..attribution import host_for
from ..errors import AtpError
from .usage import UsageError, check_at_least, check_device, check_output, check_registered

FIELDS = ("clean", "corrupt", "answer", "wrong")
PROMPTS_SHOWN = 6  # pairs the report shows token by token
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Pair:
    clean: str
    corrupt: str
    answer: str
    wrong: str
    where: str  # "pairs.jsonl line 3", "--clean #2": for error messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True,
                        help="'demo', a local Hugging Face model directory, or a TransformerLens model name")
    given = parser.add_argument_group("pairs on the command line (repeat each option once per pair)")
    helps = {"clean": "clean prompt", "corrupt": "corrupt prompt, token-aligned with the clean one",
             "answer": "the correct next token on the clean prompt, e.g. ' Mary'", "wrong": "the competing token"}
    for field in FIELDS:
        given.add_argument(f"--{field}", action="append", default=[], metavar="TEXT", help=helps[field])
    parser.add_argument("--pairs", metavar="FILE",
                        help="JSONL (one object per line), JSON array or CSV file with the fields clean, corrupt, "
                             "answer, wrong")
    parser.add_argument("--nodes", default="attn_z,mlp_neurons",
                        help="comma-separated node types (default attn_z,mlp_neurons)")
    parser.add_argument("--method", default="atp*", help="attribution method (default atp*)")
    parser.add_argument("--top-k", type=int, default=20,
                        help="nodes in the table and the output files (default 20, and at least --verify; 0 = every "
                             "node in the files)")
    parser.add_argument("--verify", type=int, default=0, metavar="K",
                        help="verify the top K nodes by exact activation patching (default 0)")
    parser.add_argument("--out-csv", metavar="PATH", help="write the ranked nodes as CSV")
    parser.add_argument("--out-json", metavar="PATH", help="write the ranked nodes and the run's settings as JSON")
    parser.add_argument("--report", metavar="PATH",
                        help="write a self-contained HTML report (figures embedded); its heatmaps are also written "
                             "next to it as <stem>_<node type>.png, e.g. out_attn_z.png for out.html, overwriting "
                             "files of those names")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward/backward pass (default 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output (by default: bars on a terminal, and for exhaustive work, e.g. "
                             "--method ap or a large --verify, its size, a time estimate and a line every 10 s)")


def run(args: argparse.Namespace) -> int:
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    _check_options(args, nodes)
    _check_outputs(args, nodes)
    pairs = read_pairs(Path(args.pairs), stream=True) if args.pairs else _given_pairs(args)
    first = list(itertools.islice(pairs, PROMPTS_SHOWN))
    device = check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, model_label = load_model(args.model, device, DTYPES[args.dtype], quiet=args.quiet)
    if isinstance(pairs, JsonlPairs):  # tokenized later, a batch at a time
        known: dict[str, int] = {}  # answer word -> token id, tokenized once for every pass
        clean: Any = PairStream.named(lambda: _labelled(model, pairs, known))
        corrupt, metric = None, metrics.logit_diff_labels()
    else:
        answers, wrongs = _answer_ids(model, pairs)
        _check_alignment(model, pairs)
        clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
        metric = metrics.logit_diff(answers, wrongs)
    torch.set_grad_enabled(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = attribute(model, clean, corrupt, metric, nodes=nodes,
                               method=args.method, batch_size=args.batch_size,
                               progress=False if args.quiet else None)  # None: bars on a terminal, long work anywhere
        except AtpError as e:  # what the library names as a problem of the input (a node type this model
            raise UsageError(str(e)) from e  # lacks, prompts past its context); any other error is a bug
        verified = result.verify(args.verify) if args.verify else None  # warns when K exceeds the nodes
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"atp rank: warning: {w.message}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    rows = max(args.top_k, args.verify) if args.top_k else 0  # every verified node is shown
    table = ranked_table(result, verified, rows)

    print(f"atp rank: {model_label}; {result.n_pairs} pair(s); method {result.method}; "
          f"{table.attrs['n_nodes']} nodes ({', '.join(nodes)}); {elapsed:.1f}s")
    n_verified = 0 if verified is None else len(verified)  # --verify above the number of nodes verifies them all
    print("metric: logit(answer) - logit(wrong) at the last token" + (
        f"; top {n_verified} verified by exact patching" if n_verified else ""))
    shown = table.head(rows or 20)
    columns = ["rank", "node", "score"] + [c for c in ("signed", "effect", "mean_abs_effect")
                                           if c in shown and shown[c].notna().any()]
    print(shown[columns].to_string(index=False, float_format=lambda v: f"{v:10.5f}"))

    written = []
    if args.out_csv:
        table.to_csv(args.out_csv, index=False)
        written.append(args.out_csv)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({
            "model": model_label, "method": result.method, "nodes": nodes, "n_pairs": result.n_pairs,
            "metric": "logit(answer) - logit(wrong) at the last token", "alignment": result.alignment,
            "dtype": args.dtype, "verified": n_verified, "ranked": _records(table)}, indent=1))
        written.append(args.out_json)
    if args.report:
        from ..report import write_report
        write_report(result, args.report, verified=verified, top_k=rows or 20, model_label=model_label,
                     metric_label="logit(answer) - logit(wrong) at the last token",
                     prompts=PROMPTS_SHOWN, prompt_labels=[f"{p.answer!r} vs {p.wrong!r}" for p in first])
        written.append(args.report)
    if written:
        print("wrote " + ", ".join(written))
    return 0


def _check_options(args: argparse.Namespace, nodes: list[str]) -> None:
    check_registered("--method", [args.method], plugins.backends(), "method(s)")
    check_registered("--nodes", nodes, plugins.adapters(), "node type(s)")
    check_at_least(0, top_k=args.top_k, verify=args.verify)
    check_at_least(1, batch_size=args.batch_size)
    if args.pairs and any(getattr(args, f) for f in FIELDS):
        raise UsageError("give pairs either with --pairs FILE or with --clean/--corrupt/--answer/--wrong, not both")


def _check_outputs(args: argparse.Namespace, nodes: list[str]) -> None:
    """Every output file (and the report's figures) can be written, before any work."""
    for option in ("out_csv", "out_json", "report"):
        check_output(f"--{option.replace('_', '-')}", getattr(args, option))
    if args.report:
        from ..report import figure_path
        for node in nodes:  # the figures write_report puts next to the HTML
            check_output("--report", figure_path(args.report, node))


def _given_pairs(args: argparse.Namespace) -> list[Pair]:
    counts = {f: len(getattr(args, f)) for f in FIELDS}
    if not any(counts.values()):
        raise UsageError("no prompt pairs: give --pairs FILE, or --clean, --corrupt, --answer and --wrong")
    if len(set(counts.values())) != 1:
        raise UsageError("give --clean, --corrupt, --answer and --wrong once per pair each; got "
                         + ", ".join(f"{n} --{f}" for f, n in counts.items()))
    return [Pair(clean, corrupt, answer, wrong, where=f"pair #{i + 1} on the command line")
            for i, (clean, corrupt, answer, wrong) in enumerate(zip(args.clean, args.corrupt, args.answer, args.wrong))]


@overload
def read_pairs(path: Path, *, stream: Literal[False]) -> list[Pair]: ...


@overload
def read_pairs(path: Path, *, stream: bool) -> list[Pair] | JsonlPairs: ...


def read_pairs(path: Path, *, stream: bool) -> list[Pair] | JsonlPairs:
    """The pairs of ``--pairs FILE``, the one reader of ``atp rank`` and ``atp circuit``: every pair
    checked now, before any model loads, each with the line it came from (for messages).

    A JSONL file comes back, with ``stream``, as ``JsonlPairs`` (read a line at a time on each pass,
    so memory stays flat however many pairs it holds), else as a list; a JSON array or CSV file is
    read whole, as a list."""
    pairs: list[Pair] | JsonlPairs
    if not _is_jsonl(path):
        pairs = _whole_file_pairs(path)
    elif stream:
        pairs = JsonlPairs(path)
    else:
        pairs = list(JsonlPairs(path))
    if sum(1 for _ in pairs) == 0:  # a stream read to its end: every line checked
        raise UsageError(f"--pairs {path}: the file holds no pairs")
    return pairs


def _is_jsonl(path: Path) -> bool:
    """Whether ``--pairs`` is a JSONL file (read a line at a time), not a JSON array or a table."""
    if not path.is_file():
        raise UsageError(f"--pairs {path}: {'not a regular file' if path.exists() else 'no such file'}")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return False
    try:
        with path.open(encoding="utf-8-sig") as f:
            while (char := f.read(1)).isspace():
                pass
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--pairs {path}: cannot read it as UTF-8 text ({e})") from e
    return char != "["  # a JSON array, pretty-printed or not, whatever the file's name


@dataclass(frozen=True)
class JsonlPairs:
    """The pairs of a JSONL file, read a line at a time each time it is iterated."""

    path: Path

    def __iter__(self) -> Iterator[Pair]:
        try:
            with self.path.open(encoding="utf-8-sig") as f:
                yield from _jsonl_pairs(str(self.path), f)
        except UnicodeDecodeError as e:
            raise UsageError(f"--pairs {self.path}: cannot read it as UTF-8 text ({e})") from e


def _labelled(model: Any, pairs: Iterable[Pair], known: dict[str, int]
              ) -> Iterator[tuple[str, tuple[str, str, list[int]]]]:
    """(where, (clean, corrupt, [answer id, wrong id])) per pair: a labelled stream's items;
    ``known`` keeps the answer words' ids from pair to pair and pass to pass."""
    for p in pairs:
        if p.answer not in known or p.wrong not in known:
            answer, wrong = _answer_ids(model, [p])
            known[p.answer], known[p.wrong] = int(answer), int(wrong)
        yield p.where, (p.clean, p.corrupt, [known[p.answer], known[p.wrong]])


def _whole_file_pairs(path: Path) -> list[Pair]:
    """Pairs from a JSON array or CSV file (``read_pairs`` reads JSONL files, and ``_is_jsonl``
    checks the path first)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the header
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--pairs {path}: cannot read it as UTF-8 text ({e})") from e
    suffix = path.suffix.lower()
    if text.lstrip().startswith("["):  # a JSON array, pretty-printed or not, whatever the file's name
        pairs = _json_array_pairs(str(path), text)
    elif suffix in (".csv", ".tsv"):
        pairs = _csv_pairs(str(path), text, "\t" if suffix == ".tsv" else ",")
    else:
        raise UsageError(f"--pairs {path}: unknown file type {suffix!r}; use .jsonl (one JSON object per line), "
                         ".json (a JSON array of objects) or .csv")
    return pairs


def _pair(fields: dict[str, Any], where: str) -> Pair:
    missing = [f for f in FIELDS if f not in fields or fields[f] is None]
    if missing:
        raise UsageError(f"{where}: missing field(s) {missing}; every pair needs {', '.join(FIELDS)}")
    for f in FIELDS:
        if not isinstance(fields[f], str):
            raise UsageError(f"{where}: field {f!r} must be a string, got {type(fields[f]).__name__} {fields[f]!r}")
        if not fields[f].strip():
            raise UsageError(f"{where}: field {f!r} is empty")
    return Pair(fields["clean"], fields["corrupt"], fields["answer"], fields["wrong"], where=where)


def _jsonl_pairs(name: str, lines: Iterable[str]) -> Iterator[Pair]:
    for number, line in enumerate((line.rstrip("\r\n") for line in lines), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{name} line {number}: not valid JSON ({e.msg} at column {e.colno}); a JSONL file holds "
                             "one JSON object per line (or give a JSON array of objects)") from e
        if not isinstance(obj, dict):
            raise UsageError(f"{name} line {number}: expected a JSON object with fields {', '.join(FIELDS)}, "
                             f"got {type(obj).__name__}")
        yield _pair(obj, f"{name} line {number}")


def _json_array_pairs(name: str, text: str) -> list[Pair]:
    """Pairs from a JSON array of objects (pretty-printed or not), each named by its item number and line."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(items, list):  # text starting with "[" that parses is an array; kept for type checkers
        raise UsageError(f"{name}: expected a JSON array of objects")
    # where each item starts, for the messages: walk the (valid) array again one value at a time
    decoder, lines, at = json.JSONDecoder(), [], text.index("[") + 1
    for _ in items:
        while text[at] in " \t\r\n,":
            at += 1
        lines.append(text.count("\n", 0, at) + 1)
        at = decoder.raw_decode(text, at)[1]
    pairs = []
    for number, (obj, line) in enumerate(zip(items, lines), start=1):
        where = f"{name} item {number} (line {line})"
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, "
                             f"got {type(obj).__name__}")
        pairs.append(_pair(obj, where))
    return pairs


def _csv_pairs(name: str, text: str, delimiter: str) -> list[Pair]:
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    header = [h.strip() for h in header]
    missing = [f for f in FIELDS if f not in header]
    if missing:
        raise UsageError(f"{name} line 1: the header lacks column(s) {missing}; it must name {', '.join(FIELDS)} "
                         f"(got {header})")
    pairs = []
    for row in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            hint = "quote fields that contain the delimiter" if len(row) > len(header) else "a field is missing"
            raise UsageError(f"{name} line {number}: {len(row)} column(s), the header has {len(header)} ({hint})")
        pairs.append(_pair(dict(zip(header, row)), f"{name} line {number}"))
    return pairs


def load_model(spec: str, device: str, dtype: torch.dtype, quiet: bool = False) -> tuple[Any, str]:
    """The model named by ``--model`` and a label for it: the bundled demo model, a local Hugging
    Face directory (TransformerBridge, compatibility mode) or a TransformerLens name (hub)."""
    note = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    if spec == "demo":
        from ..demo_task import load_demo_model
        try:
            return load_demo_model(device=device, dtype=dtype), "bundled IOI demo model"
        except FileNotFoundError as e:
            raise UsageError(f"the bundled demo model is missing ({e}); reinstall atp-plugin") from e
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {spec}: the directory has no config.json; give a Hugging Face model directory "
                             "(save_pretrained), 'demo', or a TransformerLens model name")
        return _boot_bridge(spec, str(path), device, dtype, quiet, note)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UsageError(f"--model {spec}: {'not a directory' if path.exists() else 'no such directory'}; give "
                         "'demo', a Hugging Face model directory, or a TransformerLens model name")
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens 4 removed it: the hub name booted as a TransformerBridge
        _check_hub(spec, spec)
        return _boot_bridge(spec, spec, device, dtype, quiet, note)
    from transformer_lens.loading_from_pretrained import get_official_model_name
    try:
        repo = get_official_model_name(spec)
    except ValueError:  # not a TransformerLens name: from_pretrained says so below, without the hub
        repo = None
    if repo is not None:
        _check_hub(spec, repo)
    note(f"loading {spec} with HookedTransformer.from_pretrained...")
    try:
        model = HookedTransformer.from_pretrained(spec, device=device, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model {spec}: could not load it as a TransformerLens model "
                         f"({type(e).__name__}: {str(e)[:300]})") from e
    return model.eval(), f"{spec} (HookedTransformer)"


def _check_hub(spec: str, repo: str) -> None:
    """Fail at once, rather than after half a minute of the hub client's retries, when ``repo`` is
    not in the local Hugging Face cache and the hub cannot be reached: offline mode is set
    (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) or a connection to it fails within 1.5 s (not tried
    behind a proxy, which the connection would bypass)."""
    from huggingface_hub import constants, try_to_load_from_cache
    try:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: the loader says so without the hub
        return
    flags = [f for f in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
             if os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE")]
    if flags:
        why = f"{flags[0]} is set"
    elif any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    else:
        host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=1.5).close()
            return
        except OSError as e:
            why = f"{host} cannot be reached: {e}"
    raise UsageError(f"--model {spec}: could not load the Hugging Face model: offline ({why}) and {repo} is not in "
                     f"the local Hugging Face cache ({constants.HF_HUB_CACHE}); connect, or give a local model "
                     "directory or 'demo'")


def _boot_bridge(spec: str, name: str, device: str, dtype: torch.dtype, quiet: bool, note) -> tuple[Any, str]:
    """``name`` (a local directory or a hub name) as a TransformerBridge in compatibility mode."""
    from transformer_lens.model_bridge import TransformerBridge
    note(f"loading {spec} as a TransformerBridge (compatibility mode)...")
    if quiet:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        bridge.enable_compatibility_mode(disable_warnings=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported as what it is
        raise UsageError(f"--model {spec}: could not load the Hugging Face model ({type(e).__name__}: {e})") from e
    return bridge.eval(), f"{spec} (TransformerBridge)"


def _answer_ids(model: Any, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every answer and wrong token (each must be one token)."""
    if getattr(model, "tokenizer", None) is None:
        raise UsageError("the model has no tokenizer, so text prompts cannot be used with it")
    ids: dict[str, list[torch.Tensor]] = {"answer": [], "wrong": []}
    for p in pairs:
        for field in ids:
            try:
                ids[field].append(metrics.token_ids(model, [getattr(p, field)], what=field))
            except ValueError as e:  # several tokens, or a word the tokenizer does not know
                raise UsageError(f"{p.where}: {e}") from e
    return torch.cat(ids["answer"]), torch.cat(ids["wrong"])


def _check_alignment(model: Any, pairs: list[Pair]) -> None:
    host = host_for(model)
    for p in pairs:
        try:
            n_clean, n_corrupt = len(host.tokenize(p.clean)), len(host.tokenize(p.corrupt))
        except ValueError as e:  # a word the tokenizer does not know
            raise UsageError(f"{p.where}: {e}") from e
        if n_clean != n_corrupt:
            raise UsageError(f"{p.where}: clean has {n_clean} tokens but corrupt has {n_corrupt}; a pair must be "
                             "token-aligned (same length)")


def ranked_table(result: Any, verified: pd.DataFrame | None, top_k: int) -> pd.DataFrame:
    """Nodes ranked by score, with the verified ones' exact ``effect`` (mean over pairs), ``abs_effect``
    (its magnitude) and ``mean_abs_effect`` (mean over pairs of the magnitude, what the score
    estimates), NaN for the others; the top ``top_k`` (all when 0). ``pairs``: in how many pairs the
    node's position is a real token."""
    frame = result.to_frame()
    frame = frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    coords = [c for c in frame.columns if c not in ("rank", "node_type", "node", "score", "signed", "pairs")]
    frame = frame[["rank", "node_type", "node", *coords, "score", "signed", *(["pairs"] if "pairs" in frame else [])]]
    if verified is not None:
        effects = verified.set_index("node")
        frame["effect"] = frame["node"].map(effects["effect"])
        frame["abs_effect"] = frame["node"].map(effects["abs_effect"])
        frame["mean_abs_effect"] = frame["node"].map(effects["mean_abs_effect"])
    n_nodes = len(frame)
    frame = frame.head(top_k) if top_k else frame
    frame.attrs["n_nodes"] = n_nodes
    return frame


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: missing values (NaN, NA) become null, numpy scalars Python ones."""
    def plain(v: Any) -> Any:
        if v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
