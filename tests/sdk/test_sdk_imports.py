"""The sdk imports of dispatch only models, errors and wire, and those import no server module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dispatch"
ALLOWED = {"dispatch.models", "dispatch.errors", "dispatch.wire"}


def dispatch_imports(path: Path) -> set[str]:
    """The dispatch modules a file imports (`from dispatch import x` counts as dispatch.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dispatch"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dispatch":
                found |= {f"dispatch.{a.name}" for a in node.names}
            elif node.module.split(".")[0] == "dispatch":
                found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "sdk").glob("*.py")), ids=lambda p: p.name)
def test_the_sdk_imports_no_server_module(path: Path) -> None:
    outside = {m for m in dispatch_imports(path) if not m.startswith("dispatch.sdk")}
    assert outside <= ALLOWED, outside - ALLOWED


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_what_the_sdk_shares_imports_no_server_module(name: str) -> None:
    path = PACKAGE / f"{name.split('.')[1]}.py"
    assert dispatch_imports(path) <= ALLOWED
