"""The package as a user installs it from PyPI: ``pip wheel .`` builds a wheel that carries the MIT
license, and that wheel, installed (not editable) in a fresh virtual environment, runs ``atp demo``
from outside the repository. Nothing is downloaded: the wheel is built with this environment's
setuptools, and the fresh environment reads torch and the other dependencies from this one."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """``args`` run in ``cwd``, which must succeed: one torch thread, no package index, no PYTHONPATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout")
def test_the_wheel_carries_the_license_and_runs_the_demo_installed(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="license-files (PEP 639) needs setuptools >= 77")
    # the tracked files of the working tree, built outside it (pip builds in place: no build/ in the repo)
    source = tmp_path / "source"
    files = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        cwd=source)
    (wheel,) = (tmp_path / "dist").glob("atp_plugin-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: MIT" in z.read(metadata).decode()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(license_file) == (REPO / "LICENSE").read_bytes()
        assert "atp_plugin/data/model.safetensors" in names and "atp_plugin/py.typed" in names
        assert {f"atp_plugin/data/transcoders/layer{layer}/{name}" for layer in range(4)
                for name in ("cfg.json", "weights.safetensors")} <= set(names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # this environment's packages (torch, transformer-lens, ...) on the fresh one's path, after its own; as a
    # plain path entry its .pth files do not run, so this checkout's editable install stays out
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib.strip(), "atp_test_parent_env.pth").write_text("\n".join(sorted(here)) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import atp_plugin; print(atp_plugin.__file__)", cwd=elsewhere).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not this checkout
    run(python, "-c", "from atp_plugin.demo_task import load_demo_transcoders as load; assert len(load()) == 4",
        cwd=elsewhere)  # the transcoders' package data, read from the installed wheel
    atp = venv / ("Scripts/atp.exe" if os.name == "nt" else "bin/atp")
    demo = run(atp, "demo", "--pairs", 4, "--top", 3, cwd=elsewhere)
    assert "exact mean |I|" in demo.stdout and (elsewhere / "atp_demo_heads.png").is_file()
