"""Progress on stderr: tqdm bars on a terminal, and plain lines every few seconds elsewhere (a log
file, a job scheduler, a notebook's captured stderr), where a bar redrawn with carriage returns
would be one unreadable line or nothing at all."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

LINE_INTERVAL = 10.0  # seconds between progress lines where stderr is not a terminal
PROGRESS_MIN = 300  # patched prompts: exhaustive work larger than this is announced and shown anywhere


class _Lines:
    """A file for tqdm that writes each redraw as one line (no carriage returns)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, desc: str, unit: str, show: bool | None) -> tqdm:
    """A progress bar over ``total`` steps on stderr. ``show``: False never; None only where stderr
    is a terminal; True always: a redrawn bar on a terminal, elsewhere a line every
    ``LINE_INTERVAL`` seconds (and a last one at the end)."""
    stream = sys.stderr
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if show is False or (show is None and not terminal):
        return tqdm(total=total, disable=True)
    if terminal:
        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=LINE_INTERVAL,
                maxinterval=LINE_INTERVAL, ascii=True, ncols=100, leave=True)


def say(desc: str, text: str) -> None:
    """One line on stderr: ``atp: <desc>: <text>``."""
    print(f"atp: {desc}: {text}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``seconds`` for people: "40 s", "3.5 min", "2.1 h"."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
