"""The public names are all importable, and every package ships py.typed."""

from __future__ import annotations

from pathlib import Path

import tank_core


def test_all_names_exist() -> None:
    for name in tank_core.__all__:
        assert hasattr(tank_core, name), name


def test_all_is_sorted_and_unique() -> None:
    assert list(tank_core.__all__) == sorted(set(tank_core.__all__))


def test_packages_ship_py_typed() -> None:
    root = Path(__file__).resolve().parent.parent
    for package in ("tank_core", "tank_asyncio", "tank_trio", "tank_cli"):
        assert (root / package / "py.typed").is_file(), package
