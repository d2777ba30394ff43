"""The public names are all importable, and every package ships py.typed."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest

import tank_core


def test_all_names_exist() -> None:
    for name in tank_core.__all__:
        assert hasattr(tank_core, name), name


def test_all_is_sorted_and_unique() -> None:
    assert list(tank_core.__all__) == sorted(set(tank_core.__all__))


def test_packages_ship_py_typed() -> None:
    root = Path(__file__).resolve().parent.parent
    for package in ("tank_core", "tank_asyncio", "tank_trio", "tank_asgi", "tank_cli"):
        assert (root / package / "py.typed").is_file(), package


def test_the_top_level_is_small_and_the_rest_is_grouped_by_role() -> None:
    # The names most users need; events, actions and notifications in their own namespaces.
    assert len(tank_core.__all__) <= 20
    for namespace in ("events", "actions", "notifications"):
        assert namespace in tank_core.__all__


def test_every_module_exports_what_it_names() -> None:
    for info in pkgutil.walk_packages(tank_core.__path__, "tank_core."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), (info.name, name)


@pytest.mark.parametrize("module", [tank_core.events, tank_core.actions, tank_core.notifications])
def test_events_actions_and_notifications_are_frozen_slotted_keyword_only(module: object) -> None:
    classes = [getattr(module, name) for name in module.__all__]  # type: ignore[attr-defined]
    for cls in classes:
        if not dataclasses.is_dataclass(cls):
            continue  # unions, enums, helpers
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, cls
        assert hasattr(cls, "__slots__"), cls
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls
