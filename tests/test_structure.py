"""The code's shape, checked: short functions, no import cycles inside xlab/, and a model import that stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xlab"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """xlab modules that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_inside_xlab():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_importing_the_model_does_not_import_hydra_or_heavy_libraries():
    code = ("import sys, xlab.models, xlab.datamodules, xlab.inference\n"
            "heavy = [m for m in ('hydra', 'transformers', 'datasets', 'wandb', 'tensorboard') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_inference_commands_do_not_import_the_trainer():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    for command in ("xlab.evaluate", "xlab.generate", "xlab.export", "xlab.inference", "xlab.serve.__main__"):
        assert "xlab.training.trainer" not in reachable(graph, command), command


# The `python -m xlab.<command>` entry points: thin, each imports no other, and nothing imports them.
COMMANDS = {"xlab.train", "xlab.prepare", "xlab.evaluate", "xlab.generate", "xlab.export", "xlab.results",
            "xlab.plot", "xlab.sweep", "xlab.serve.__main__"}
# What may sit at the top of xlab/ besides the commands and the stage packages: the shared core and the two public
# API modules of the README's "Use in your code".
CORE = {"xlab", "xlab.cli", "xlab.schema", "xlab.registry", "xlab.errors", "xlab.fsio", "xlab.device",
        "xlab.inference", "xlab.datamodules"}
PACKAGES = {"xlab.models", "xlab.data", "xlab.checkpoint", "xlab.training", "xlab.generation", "xlab.evaluation",
            "xlab.serve"}


def test_no_command_imports_another_and_no_package_imports_a_command():
    mods = modules()
    assert COMMANDS <= set(mods), COMMANDS - set(mods)
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    bad = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if b in COMMANDS]
    assert not bad, bad


def test_the_top_level_holds_only_commands_core_and_stage_packages():
    top = {".".join(name.split(".")[:2]) for name in modules()}
    assert top <= COMMANDS | CORE | PACKAGES, top - (COMMANDS | CORE | PACKAGES)


def package_graph() -> dict[str, set[str]]:
    """The import graph with each folder of xlab/ collapsed to one node (function-level imports included)."""
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}

    def node(name: str) -> str:
        head = ".".join(name.split(".")[:2])
        return head if head in PACKAGES else name

    collapsed: dict[str, set[str]] = {}
    for a, targets in graph.items():
        collapsed.setdefault(node(a), set()).update(node(b) for b in targets if node(b) != node(a))
    return collapsed


def test_the_package_graph_is_small_and_acyclic():
    graph = package_graph()
    arrows = sum(len(targets) for targets in graph.values())
    assert len(graph) <= 25 and arrows <= 110, (len(graph), arrows)
    assert find_cycle(graph) is None, find_cycle(graph)


def function_level_imports() -> list[tuple[str, int, list[str]]]:
    """(module, line, the lines of its import group) of every import inside a function in xlab/."""
    found = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        first = node.lineno - 1
                        while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                            first -= 1  # a comment anywhere in a group of imports covers the group
                        found.append((name, node.lineno, lines[first:node.end_lineno]))
    return found


def test_function_level_imports_are_few_and_each_says_why():
    """A function-level import hides a dependency from the module's header: each is for an optional dependency or
    for start-up time, said in a comment on its line or on its group's."""
    found = function_level_imports()
    assert len(found) <= 60, len(found)
    unexplained = [f"{name}:{line}" for name, line, group in found if not any("#" in text for text in group)]
    assert not unexplained, unexplained


def test_the_public_api_is_one_object_under_each_of_its_names():
    """`from xlab import ...` and the README's paths (xlab.models, xlab.datamodules, xlab.inference) agree."""
    import xlab
    from xlab import inference
    from xlab.datamodules import XLabDataModule
    from xlab.generation import api
    from xlab.models import MODELS, XLabModel

    assert xlab.XLabModel is XLabModel is MODELS.get("transformer")
    assert xlab.XLabDataModule is XLabDataModule
    assert (inference.generate, inference.sample, inference.load_for_decoding) == \
        (api.generate, api.sample, api.load_for_decoding)
