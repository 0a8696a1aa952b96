"""The code's shape, measured: modules of a few hundred lines with one job each, classes that fit in a head,
no import cycle inside ``farm`` (counting imports inside functions too), and no test hooks in production."""

from __future__ import annotations

import ast
from pathlib import Path

FARM = Path(__file__).resolve().parent.parent / "farm"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300
# Over the limit, and why it is not split yet: the decoder/encoder is being rewritten (issue 15); splitting
# it here would collide with that rewrite. Each entry must still be over the limit (else drop it).
PENDING: dict[str, str] = {}  # module -> why it may stay over the limit for now


def modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(FARM.glob("*.py"))}


def test_no_module_over_450_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in FARM.glob("*.py")}
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in PENDING}
    assert not over, over
    assert all(sizes[name] > MAX_MODULE_LINES for name in PENDING), "a pending module got small: drop it"


def test_no_class_over_300_lines():
    big = [
        (name, c.name, c.end_lineno - c.lineno + 1)
        for name, tree in modules().items()
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef) and c.end_lineno - c.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not big, big


def imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The ``farm`` modules one module imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "farm":
                out |= {a.name for a in node.names if a.name in names}
            elif node.module.startswith("farm."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("farm.")}
    return out


def test_no_import_cycle_within_farm():
    trees = modules()
    names = {n.removesuffix(".py") for n in trees}
    graph = {n.removesuffix(".py"): imports(t, names) - {n.removesuffix(".py")} for n, t in trees.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_inside_functions_count():
    a = ast.parse("from farm.b import x\n")
    b = ast.parse("def f():\n    from farm import a\n")
    assert imports(a, {"a", "b"}) == {"b"} and imports(b, {"a", "b"}) == {"a"}


def test_no_test_hooks_in_production_modules():
    hooks = ("FARM_ACTOR_SLOT", "PASS2_SUPPORTED")
    for root in (FARM, FARM.parent / "actors"):
        for p in root.glob("*.py"):
            text = p.read_text()
            assert not [h for h in hooks if h in text], p
