"""The house rules of the layout, read from the source (AST only, under a second).

1. Imports point one way: commands -> subpackages -> core. Each subpackage has a rank; a module may
   import (at module level or inside a function) only its own package or packages of a lower rank,
   and never a command (a file directly in utils/, a top-level script, hf/).
2. No import cycle between modules.

What keeps the code easy to follow is the path a reader walks, not the size of a file: tests/test_step_path.py
bounds the project files one optimizer step runs through.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"core": 0, "data": 1, "lora": 1, "tiny": 1, "hub": 2, "training": 3, "inference": 3,
        "compat": 3.5, "sweep": 4, "bench": 4}


def sources() -> list[Path]:
    files = [*ROOT.glob("*.py"), *(ROOT / "hf").glob("*.py"), *(ROOT / "utils").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    return sorted(p for p in files if ".venv" not in p.parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "utils" or len(parts) < 2 or (len(parts) == 2 and parts[1] not in RANK):
        return None  # not in a subpackage: a command (or a top-level script, hf/, tests/)
    return parts[1]


@functools.cache
def known_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in sources())


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from utils import trainer`
    return found & known_modules()


def test_imports_point_from_commands_to_subpackages_to_core():
    wrong = []
    for path in sources():
        me = module_name(path)
        if not me.startswith("utils.") or package_of(me) is None:
            continue  # commands, scripts and tests may import anything below them
        for other in imports(path):
            theirs = package_of(other)
            if theirs is None:
                wrong.append(f"{me} imports the command {other}")
            elif theirs != package_of(me) and RANK[theirs] >= RANK[package_of(me)]:
                wrong.append(f"{me} ({package_of(me)}) imports {other} ({theirs}): not a lower rank")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in sources()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in graph:
        if start not in state:
            visit(start, [start])
