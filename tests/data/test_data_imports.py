"""The data stage's imports: nothing from a later stage, no cycle (lazy imports included), and
`build_loader`'s module above both loaders, imported by none of the stage's modules."""

import ast
from pathlib import Path

import casm_deploy.data

FOLDER = Path(casm_deploy.data.__file__).parent
# What the data stage may use: the modules below it.
BELOW = ("casm_deploy.errors", "casm_deploy.options", "casm_deploy.config", "casm_deploy.common.")


def imports(path: Path) -> set[str]:
    """The casm_deploy modules `path` imports, anywhere in it (in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "casm_deploy.data":
            found.update(f"casm_deploy.data.{alias.name}" for alias in node.names)  # a module
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name.startswith("casm_deploy")}


def graph() -> dict[str, set[str]]:
    return {f"casm_deploy.data.{p.stem}": imports(p) for p in FOLDER.glob("*.py")}


def test_the_data_stage_imports_nothing_from_a_later_stage():
    for module, used in graph().items():
        later = [u for u in used if not u.startswith(("casm_deploy.data.", *BELOW))]
        assert not later, f"{module} imports {later}"


def test_no_cycles_and_nothing_imports_build_loaders_module():
    modules = graph()
    assert not [m for m, used in modules.items() if "casm_deploy.data.loader" in used]
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module in done or module not in modules:
            return
        path.append(module)
        for used in modules[module]:
            visit(used)
        path.pop()
        done.add(module)

    for module in modules:
        visit(module)
