"""Packaging (issue 10): ``make serve`` installs only what serving needs, ``make test`` everything, and
``make serve`` after ``make test`` installs nothing; a build has no setuptools warning and ships the
status page and tank.js; the version is written once, in pyproject.toml.

The Makefile runs against a stub venv (``VENV=``, ``PYTHON=``) whose ``python`` and ``tank`` only log
how they were called: nothing is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tank_core", "tank_asyncio", "tank_trio", "tank_cli")

_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    cp "$0" "$3/bin/tank"
fi
"""


def _stub_python(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls.log"
    log.touch()
    stub = tmp_path / "python3"
    stub.write_text(_STUB.format(log=log))
    stub.chmod(0o755)
    return stub, log


def _make(target: str, venv: Path, python: Path) -> None:
    make = shutil.which("make")
    assert make is not None, "make is missing"
    subprocess.run([make, "-s", "-C", str(ROOT), f"VENV={venv}", f"PYTHON={python}", target],
                   check=True, timeout=60, capture_output=True)


def _installs(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " -m pip install" in line]


def test_make_serve_installs_only_what_serving_needs(tmp_path: Path) -> None:
    python, log = _stub_python(tmp_path)
    venv = tmp_path / "venv"
    _make("serve", venv, python)
    calls = log.read_text().splitlines()
    assert calls[0] == f"python3 -m venv {venv}"
    assert _installs(log) == [
        "python -m pip install --quiet --upgrade pip",
        "python -m pip install --quiet -e .[trio,fast]",
    ]
    assert calls[-1] == "tank serve"
    # Again: nothing to install.
    log.write_text("")
    _make("serve", venv, python)
    assert log.read_text().splitlines() == ["tank serve"]


def test_make_test_installs_the_test_toolchain_and_make_serve_then_installs_nothing(
    tmp_path: Path,
) -> None:
    python, log = _stub_python(tmp_path)
    venv = tmp_path / "venv"
    _make(f"{venv}/.installed", venv, python)  # what `make test` installs before it runs anything
    assert _installs(log)[-1] == "python -m pip install --quiet -e .[test]"
    log.write_text("")
    _make("serve", venv, python)
    assert log.read_text().splitlines() == ["tank serve"]


def test_the_test_extra_holds_what_serving_needs() -> None:
    # `make serve` after `make test` relies on it.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["trio"]) | set(extras["fast"]) <= set(extras["test"])


def test_the_version_is_written_once_in_pyproject() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".js", ".html"):
                text = path.read_text(encoding="utf-8")
                assert not re.search(rf"(?<![\d.]){re.escape(version)}(?![\d.])", text), path


def _warnings(output: str) -> list[str]:
    """Warning lines of a build: Python warnings (``file.py:N: Category: ...``), setuptools' and
    distutils' ``warning:`` lines, and any other line that says "warn" (but pip's notes on the
    machine's index configuration)."""
    found = []
    for line in output.splitlines():
        if re.search(r"\.py:\d+: \w+: ", line) or (
            re.search(r"warn", line, re.IGNORECASE) and "is ignored: it is neither" not in line
        ):
            found.append(line.strip())
    return found


def test_a_build_has_no_setuptools_warning_and_ships_the_static_files(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *(["MANIFEST.in"] if (ROOT / "MANIFEST.in").exists()
                                                 else [])):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # Build isolation, as `pip install` and `make` do: the build requirement is fetched.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "out"),
         str(source)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    if done.returncode != 0 and "No matching distribution found for setuptools" in done.stderr:
        pytest.fail("cannot fetch the build requirement (setuptools): no package index?")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _warnings(done.stdout + done.stderr) == []
    (wheel,) = (tmp_path / "out").glob("tank_python-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
        meta = archive.read(metadata).decode()
    for name in ("tank_core/server/static/tank.js", "tank_core/server/static/status.html",
                 "tank_core/py.typed", "tank_asyncio/py.typed", "tank_trio/py.typed",
                 "tank_cli/py.typed"):
        assert name in names, name
    assert "License-Expression: MIT" in meta.splitlines()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"Version: {version}" in meta.splitlines()
