"""The shape of the package: imports flow one way through the layers, modules and functions stay readable, and the
code passes the linter configured in pyproject.toml."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nag"

# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = [
    ("core", ["nag.settings", "nag.combine", "nag.kernels", "nag.compiled", "nag.fused"]),
    ("state and descriptions", ["nag.state", "nag.spec", "nag.schedule", "nag.signatures"]),
    ("attention mechanisms", ["nag.attention"]),
    ("installation and hooks", ["nag.hooks", "nag.control"]),
    ("families", ["nag.families"]),
    ("pipeline API", ["nag.checks", "nag.patching", "nag.pipeline", "nag.denoiser", "nag"]),
    ("applications", ["nag.session", "nag.grid", "nag.cli", "nag.ui", "nag.demo", "nag.evaluation", "nag.toy",
                      "nag.__main__"]),
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60  # code lines, docstring excluded: one screen


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ``nag`` module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import submodule` imports the submodule; `from pkg import name`, the package itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from .x import name`: the module is x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != "nag" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{name} belongs to no layer of tests/test_architecture.py: add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer_and_imports_flow_down():
    upward = []
    for name, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name) and not target.startswith(name + "."):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ importing its own submodules is how packages work; their imports of it would cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a module importing one that imports it back, and an upward import."""
    assert "nag.state" in imports_of("nag.attention.base", PACKAGE / "attention" / "base.py", set(modules()))
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: {"nag.state": {"nag.pipeline"},
                                                                         "nag.pipeline": {"nag.state"}})
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="against the layers"):
        test_every_module_has_a_layer_and_imports_flow_down()


def test_modules_and_functions_fit_a_reader():
    too_long = []
    for name, path in modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
                start = first.end_lineno + 1 if has_doc and isinstance(first.value.value, str) else node.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_lint_is_clean():
    """ruff, as configured in pyproject.toml (the test extra installs it)."""
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks", "scripts", "training", "examples"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_processor_table_in_the_docs_is_current():
    from nag.attention import processor_table
    from nag.families import mechanisms

    rows = ["| mechanism | stock processor | straightforward wrapper | fast wrapper |", "|---|---|---|---|"]
    rows += ["| " + " | ".join(f"`{x}`" if x != "*" else "any" for x in row) + " |"
             for row in processor_table(mechanisms())]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc.split("<!-- processor-table -->\n")[1].split("\n<!-- /processor-table -->")[0]
    assert table == "\n".join(rows), "regenerate the table in docs/architecture.md"
