"""What the benchmark scripts share: timing, memory readers and writing a table into a markdown
section (no TransformerLens import, so both major versions load it)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds, after one warm-up call each.
    Rounds run every function in turn, so a load that comes and goes on the machine hits them
    alike and the ratios stay fair."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_kb() -> int:
    """This process's peak resident memory (VmHWM), kB."""
    return status_kb("VmHWM")


def status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_section(path: Path, section: str, body: str) -> None:
    """Replace the part of ``path`` between this section's markers with ``body`` (append if absent)."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
