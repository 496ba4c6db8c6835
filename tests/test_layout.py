"""The package's layout holds (ARCHITECTURE.md): every import points down the flow, deploy/'s
three parts stand on its runtime, there is no import cycle (imports inside functions count), and
no module grows past its limit."""

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
# Inside deploy/: three parts over one runtime. runtime/ (opening a model file, its backends,
# Masker) imports neither export/ nor infer/; export/ and infer/ import runtime/, not each other.
DEPLOY_PARTS = {
    "deploy.runtime": {"deploy.runtime"},
    "deploy.export": {"deploy.export", "deploy.runtime"},
    "deploy.infer": {"deploy.infer", "deploy.runtime"},
}
# A module holds one job; one may run this long where the job is that long (ruff's complexity
# limit, in pyproject.toml, keeps each function in bounds).
MAX_MODULE_LINES = 700
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


def deploy_part(name: str) -> str | None:
    """The part of deploy/ a module is in ("deploy.runtime", ...); None outside deploy/ and for
    deploy/__init__ itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "deploy" and len(parts) > 1 else None


def deploy_crossings(edges: dict[str, set[str]]) -> list[str]:
    """The imports from one part of deploy/ into a part it may not use."""
    return [
        f"casm_deploy.{name} imports casm_deploy.{target}"
        for name, targets in edges.items()
        if deploy_part(name) is not None
        for target in sorted(targets)
        if deploy_part(target) is not None
        and deploy_part(target) not in DEPLOY_PARTS.get(deploy_part(name), set())
    ]


def test_every_deploy_module_is_in_a_part():
    loose = [name for name in graph() if deploy_part(name) not in (None, *DEPLOY_PARTS)]
    assert not loose


def test_deploy_parts_stand_on_the_runtime():
    assert not deploy_crossings(graph())


# The calls that open an exported file: only deploy/runtime/ makes them (and artifact.py, whose
# load_torchscript checks a TorchScript file's code before torch.jit.load).
OPENERS = {"InferenceSession", "load_torchscript", "torch.jit.load", "torch.export.load"}
OPENING_MODULES = ("deploy.runtime", "artifact")


def called(tree: ast.Module) -> set[str]:
    """The dotted names `tree` calls: `f`, `module.f`, `torch.export.load`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                names.add(".".join([func.id, *reversed(parts)]))
    return names


def test_only_the_runtime_opens_a_model_file():
    """One way to open an exported file: infer, eval, Masker and export's parity all go through
    deploy/runtime/."""
    opening = {
        name: sorted(n for n in called(tree) if n in OPENERS or n.split(".")[-1] in OPENERS)
        for name, tree in modules().items()
        if not name.startswith(OPENING_MODULES)
    }
    assert not {name: calls for name, calls in opening.items() if calls}


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
    # the runtime importing export's parity, and infer importing export's job
    planted = {
        "deploy.runtime.open": {"deploy.export.parity", "deploy.runtime.info"},
        "deploy.infer.job": {"deploy.export.job", "deploy.runtime.masker"},
        "deploy.export.parity": {"deploy.runtime.open", "evaluation.metrics"},
    }
    assert deploy_crossings(planted) == [
        "casm_deploy.deploy.runtime.open imports casm_deploy.deploy.export.parity",
        "casm_deploy.deploy.infer.job imports casm_deploy.deploy.export.job",
    ]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_modules_stay_short(path):
    name = module_name(path)
    lines = len(path.read_text().splitlines())
    if name not in LONG_MODULES:
        assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"


# The two walks ARCHITECTURE.md draws: the modules a reader opens to follow a training run from
# `casm-deploy train` to one CASM step and a saved checkpoint, and an infer from `casm-deploy
# infer` to a row of boxes.jsonl. Calls into the layers below that their names explain (the
# dataset, decoding, masks_to_boxes) are not part of a walk.
WALKS = {
    "train": ["cli", "training.train", "data.loader", "models.spec", "training.casm",
              "training.pool", "checkpoint"],
    "infer": ["cli", "deploy.infer.job", "deploy.runtime.masker", "deploy.runtime.open",
              "deploy.runtime.onnxruntime_backend", "deploy.infer.pipeline",
              "deploy.infer.outputs", "deploy.infer.outfolder"],
}  # fmt: skip


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_each_walk_is_at_most_8_modules_each_reached_from_one_before(walk):
    edges, path = graph(), WALKS[walk]
    assert len(path) <= 8
    for k, name in enumerate(path[1:], start=1):
        assert any(name in edges[before] for before in path[:k]), f"{walk}: {name} not reached"
    assert f"`{'` -> `'.join(path)}`" in (PACKAGE.parent / "ARCHITECTURE.md").read_text()
