"""README.md's Python code blocks run as written, in order, in one namespace (later blocks use the
quick start's ``model``, ``clean``, ``corrupt``, ``metric`` and ``result``, as the README reads).

A block may say what it needs in an HTML comment on the line before its fence, e.g.
``<!-- needs: hub -->`` or ``<!-- needs: hub, TransformerLens 3 -->``; it is skipped, with the reason,
where a need is unmet (the hub always: the tests run offline). Every other block runs, on the bundled
demo model that the quick start's offline block loads; one that raises fails its test. Blocks run in
a temporary directory (they write reports and a pairs file there).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the example plugin package the README installs with ``pip install ./examples/atp_directions``
ATP_DIRECTIONS = ROOT / "examples" / "atp_directions"

NEEDS_COMMENT = re.compile(r"^<!--\s*needs:\s*(.*?)\s*-->\s*$")


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_hooked() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


#: each need a block may declare: (is it met here?, why the block is skipped when not)
NEEDS: dict[str, tuple[Callable[[], bool], str]] = {
    "hub": (lambda: False, "downloads from the Hugging Face hub (the tests run offline)"),
    "TransformerLens 3": (_has_hooked, "needs HookedTransformer, which TransformerLens 4 removed"),
    "SAE-Lens": (lambda: _importable("sae_lens"), "needs SAE-Lens (pip install 'atp-plugin[sae]')"),
    # pip install ./examples/atp_directions, or its source on sys.path (the fixture below)
    "atp_directions": (lambda: _importable("atp_directions"), "needs examples/atp_directions"),
}


@dataclass
class Block:
    line: int             # 1-based line of the opening fence in README.md
    code: str
    needs: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text`` in order, each with the needs its preceding comment declares."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"README.md:{i + 1}: code block never closed"
            if fence[3:].strip().lower() in ("python", "py"):
                previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                match = NEEDS_COMMENT.match(previous)
                needs = tuple(n.strip() for n in match.group(1).split(",") if n.strip()) if match else ()
                blocks.append(Block(i + 1, "\n".join(lines[i + 1:end]) + "\n", needs))
            i = end + 1
        else:
            i += 1
    return blocks


def source(code: str) -> str:
    """A block's code; a doctest-style block (``>>>`` prompts) reduced to its statements, its printed
    output not compared (it depends on the model the reader loaded)."""
    if not code.lstrip().startswith(">>>"):
        return code
    return "\n".join(line[4:] for line in code.splitlines() if line.startswith((">>> ", "... ")) or
                     line in (">>>", "...")) + "\n"


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def unmet(block: Block) -> list[str]:
    """Why ``block`` cannot run here (empty: it runs)."""
    unknown = [n for n in block.needs if n not in NEEDS]
    assert not unknown, f"{block.where}: unknown need(s) {unknown}; known: {sorted(NEEDS)}"
    return [NEEDS[n][1] for n in block.needs if not NEEDS[n][0]()]


class Runner:
    """Runs the blocks in README order in one namespace, each at most once, and remembers failures."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "readme"}
        self.done: dict[int, BaseException | None] = {}   # index -> what it raised (None: ran)

    def run_through(self, index: int) -> None:
        for i in range(index + 1):
            if i in self.done or unmet(BLOCKS[i]):
                continue
            try:
                exec(compile(source(BLOCKS[i].code), BLOCKS[i].where, "exec"), self.namespace)
            except BaseException as e:  # noqa: B036  (reported by that block's own test)
                self.done[i] = e
            else:
                self.done[i] = None


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A Runner working in a temporary directory, with the example plugin package importable and
    matplotlib drawing off screen."""
    cwd = Path.cwd()
    path = list(sys.path)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if not _importable("atp_directions"):
        sys.path.insert(0, str(ATP_DIRECTIONS))
    os.chdir(tmp_path_factory.mktemp("readme"))
    try:
        yield Runner()
    finally:
        os.chdir(cwd)
        sys.path[:] = path


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 10, f"found only {len(BLOCKS)} python blocks in README.md"
    assert any(not b.needs for b in BLOCKS[:4]), "the quick start has no block that runs offline"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.where for b in BLOCKS])
def test_readme_block(runner: Runner, index: int) -> None:
    block = BLOCKS[index]
    reasons = unmet(block)
    if reasons:
        pytest.skip(f"{block.where}: {'; '.join(reasons)}")
    runner.run_through(index)
    failed = [i for i in range(index) if runner.done.get(i) is not None]
    error = runner.done[index]
    if error is not None:
        earlier = f" (earlier blocks that failed: {', '.join(BLOCKS[i].where for i in failed)})" if failed else ""
        raise AssertionError(f"{block.where} raised {type(error).__name__}: {error}{earlier}") from error
