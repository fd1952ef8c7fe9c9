"""The bus package's public surface: each module's ``__all__`` is exactly what it defines."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

MODULES = [
    "bus.app",
    "bus.config",
    "bus.envelope",
    "bus.errors",
    "bus.keys",
    "bus.logs",
    "bus.pipelining",
    "bus.problem",
    "bus.results",
    "bus.streams",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_cover_public_definitions(name: str) -> None:
    """Everything in __all__ exists; every public class or function defined there is in it."""
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert all(hasattr(module, n) for n in exported)
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert defined <= exported


def test_bus_does_not_import_the_gateway() -> None:
    """bus/ is its own package: no module of it imports gateway."""
    root = Path(__file__).resolve().parents[1] / "bus"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import gateway" not in text, path
        assert "from gateway" not in text, path
