"""Reading the HTML reports back, shared by the node report's and the circuit report's tests: the
DOM a real headless Chromium renders (``chromium``, ``Dom``), the tables as cell text (``tables``),
the inline SVG pictures as XML (``svgs``) and the external references a page would fetch
(``external_urls``)."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
SVG = "{http://www.w3.org/2000/svg}"


class Dom(HTMLParser):
    """Tags of a DOM dump with their attributes and text, enough to check what rendered."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: dict[int, str] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags:
            self.text[len(self.tags) - 1] = self.text.get(len(self.tags) - 1, "") + data

    def find(self, tag: str, cls: str | None = None) -> list[int]:
        return [i for i, (t, a) in enumerate(self.tags)
                if t == tag and (cls is None or cls in a.get("class", "").split())]


class _Tables(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.found: list[tuple[list[str], list[list[str]]]] = []  # (classes, rows of cell texts)
        self.open: list[list[list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            rows: list[list[str]] = []
            self.found.append((dict(attrs).get("class", "").split(), rows))
            self.open.append(rows)
        elif tag == "tr" and self.open:
            self.open[-1].append([])
        elif tag in ("td", "th") and self.open:
            self.open[-1][-1].append("")

    def handle_endtag(self, tag):
        if tag == "table" and self.open:
            self.open.pop()

    def handle_data(self, data):
        if self.open and self.open[-1] and self.open[-1][-1]:
            self.open[-1][-1][-1] += data


def tables(page: str) -> dict[str, list[list[str]]]:
    """The tables of ``page`` by class, the first of each class: its rows, each a list of cell texts
    (header cells included)."""
    out: dict[str, list[list[str]]] = {}
    for classes, rows in _Tables(page).found:
        for c in classes:
            out.setdefault(c, rows)
    return out


def svgs(page: str) -> dict[str, ET.Element]:
    """The inline ``<svg>`` pictures of ``page`` by their class, each parsed as XML (so each must be
    well-formed on its own)."""
    found = {}
    for text in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        root = ET.fromstring(text)
        found[root.get("class", "")] = root
    return found


def external_urls(page: str) -> list[str]:
    """Whatever the page would fetch or link to: ``src`` / ``href`` values other than ``data:``
    URIs and in-page anchors, and any http(s) URL other than the SVG namespace name (which is an
    identifier, never fetched)."""
    links = [v for v in re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
             if not v.startswith(("data:", "#"))]
    urls = [u for u in re.findall(r"https?://[^\s\"'<>)]+", page) if u != "http://www.w3.org/2000/svg"]
    return links + urls


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Debian's headless Chromium with ``args``, a fresh profile under ``cwd`` and no network
    services; skipped where it is not installed, a failure under CI."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI: .ci/run must install it (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); CI is not set")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={cwd / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
