"""The package's shape: one-way layers, no import cycles, a light `validate`, small functions and modules.

Imports are read with ``ast``, those inside functions included (a function-level import is still a
dependency, only a later one); imports under ``if TYPE_CHECKING:`` are annotations and do not count.
See docs/architecture.md for the layers and what each owns.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "axlora"

ALLOWED = {
    "core": {"core"},
    "config": {"core", "config"},
    "data": {"core", "config", "data"},
    "model": {"core", "config", "data", "model"},
    "train": {"core", "config", "data", "model", "train"},
    "merge": {"core", "config", "merge"},
    "commands": {"core", "config", "data", "model", "train", "merge", "commands"},
}
"""Which layers each layer may import. ``merge`` stands beside data/model/train and needs none of them."""

HEAVY = ("torch", "numpy", "transformers", "datasets", "peft", "accelerate", "deepspeed")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """``axlora.<layer>.*`` for the five packages; the package root counts as core; the rest are commands."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # ``axlora`` itself: only __version__
    if parts[1] in ALLOWED and parts[1] != "commands":
        return parts[1]
    if parts[1] == "deepspeed_configs":
        return "config"  # JSON presets, read as package data
    return "commands"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return skipped


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of ``module``; ``from pkg import sub`` names ``pkg.sub``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in MODULES else target, node.lineno))
    return found


def internal_graph() -> dict[str, set[str]]:
    return {module: {name for name, _ in imports_of(module) if name in MODULES and name != module}
            for module in MODULES}


def test_every_import_runs_down_the_layers():
    wrong = []
    for module in MODULES:
        for name, line in imports_of(module):
            if name.split(".")[0] == "axlora" and layer_of(name) not in ALLOWED[layer_of(module)]:
                wrong.append(f"{MODULES[module].relative_to(SRC)}:{line}: {layer_of(module)} imports {name} "
                             f"({layer_of(name)})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_cycles():
    assert not _cycles(internal_graph())


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_core_and_config_never_import_the_heavy_libraries():
    """Even inside functions: ``validate`` and the schema must work where torch cannot be imported."""
    wrong = [f"{MODULES[m].relative_to(SRC)}:{line}: {name}"
             for m in MODULES if layer_of(m) in ("core", "config")
             for name, line in imports_of(m) if name.split(".")[0] in HEAVY]
    assert not wrong


def test_the_layer_check_would_catch_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from axlora.train.recipe import x\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert layer_of(_resolve("axlora.config.schema", node, False)) not in ALLOWED["config"]


def test_validate_imports_no_heavy_library(tmp_path):
    """``axlora validate`` runs the whole config path and prints the plan without torch, numpy & co."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Add.", "input": "1+2", "output": "3"}) + "\n")
    config = tmp_path / "config.yml"
    config.write_text(f"base_model: axlora:tiny-llama\ndatasets:\n  - path: {data}\n    type: alpaca\n"
                      "lora_target_linear: true\nmax_steps: 2\nfsdp_config: {fsdp_version: 1}\n"
                      "num_processes: 1\n")
    script = ("import sys; from axlora.cli import main; code = main(['validate', sys.argv[1]]); "
              f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "adapter: fresh" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "LOADED []"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_fit_on_a_screen_and_modules_have_one_job(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in _functions(ast.parse(text)) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(SRC)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(SRC)}: over {MAX_MODULE_LINES} lines"
