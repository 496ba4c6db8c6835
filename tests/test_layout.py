"""The package's layout holds (ARCHITECTURE.md): every import points down the flow, there is no
import cycle (imports inside functions count), and no module or function grows past its limit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "casm_deploy"

# The flow, bottom first: a module may import from its own level or from a lower one.
LEVELS = [
    ["errors", "version", "options", "config", "common"],
    ["data"],
    ["models"],
    [
        "evaluation.metrics",
        "evaluation.boxacc",
        "evaluation.pxap",
        "evaluation.coverage",
        "evaluation.masking",
        "evaluation.localisation",
    ],
    ["artifact", "torchfile"],
    ["checkpoint"],
    ["training"],
    ["deploy", "evaluation"],
    ["commands"],  # the Typer commands made from the configs
    ["cli", "__main__", ""],  # "": the package itself (casm_deploy/__init__.py)
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Over the limit on purpose: config.py is the one place every option's default and help text is
# written (about 95 options), so its length is text, not logic.
LONG_MODULES = {"config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules `tree` imports anywhere, functions included."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from casm_deploy.data import synth` imports the module casm_deploy.data.synth
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "casm_deploy" or name.startswith("casm_deploy."):
                inner = name.removeprefix("casm_deploy").removeprefix(".")
                if inner in known:
                    found.add(inner)
    return found


def level(name: str) -> int:
    best = None
    for index, prefixes in enumerate(LEVELS):
        for prefix in prefixes:
            matches = name == prefix or (prefix and name.startswith(prefix + "."))
            # the longest prefix decides: evaluation.metrics sits below evaluation
            if matches and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    assert best is not None, f"casm_deploy.{name} has no level in tests/test_layout.py"
    return best[0]


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    # a subpackage's __init__ is imported by every import of its modules: leave it out
    return {name: imported(tree, known) - {name} for name, tree in trees.items()}


def test_every_import_points_down_the_flow():
    upward = [
        f"casm_deploy.{name} imports casm_deploy.{target}"
        for name, targets in graph().items()
        for target in sorted(targets)
        if level(target) > level(name)
    ]
    assert not upward


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles


def test_the_layout_check_finds_an_upward_import_and_a_cycle():
    # the checks above must be able to fail: a planted upward import and a planted cycle
    assert level("data.synth") < level("training.train")
    assert level("evaluation.metrics") < level("checkpoint") < level("evaluation.benchmark")
    tree = ast.parse("def f():\n    from casm_deploy.training import train\n")
    assert imported(tree, {"training.train", "training"}) == {"training.train", "training"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_modules_and_functions_stay_short(path):
    name = module_name(path)
    lines = len(path.read_text().splitlines())
    if name not in LONG_MODULES:
        assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long
