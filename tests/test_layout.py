"""The package's shape: an acyclic import graph with no upward import, small method modules, and
no method named outside ``compolab/methods/``.

Run alone with ``pytest tests/test_layout.py -q``: it reads the sources with ``ast``/``tokenize``
and imports nothing of the kit.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "compolab"

#: Bottom to top: a module imports only from its own layer or a lower one. A name ending in ".*"
#: covers a package and every module in it.
LAYERS: list[set[str]] = [
    {"errors", "io", "plotting", "runtime"},
    {"distributed"},
    {"world", "heads", "per_sample", "task_vector"},
    {"data", "models", "tuning", "fisher_store"},
    {"datasets", "real", "linear_probe", "pretrain", "fisher", "kfac", "compose", "pool", "linearize",
     "evaluate", "stem"},
    {"merging.*"},
    {"curvature", "editing", "finetune"},
    {"tmc"},
    {"methods.*"},
    {"config", "runfolder"},
    {"run", "workspace"},
    {"probes.*", "tables.*", "measure", "pool_stats", "merge_pool"},
    {"explore.*"},
    {"bench.*", "reproduce.*", "cli.*"},
    {""},  # compolab/__init__.py: the public API
]


def _modules() -> dict[str, Path]:
    """``compolab.x.y -> path`` for every module of the package, written relative to ``compolab``."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the kit it imports`` (function-level imports included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = ("compolab." + package).strip(".").split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                bases, names = [base], [alias.name for alias in node.names]
            else:
                continue
            for base in bases:
                if base != "compolab" and not base.startswith("compolab."):
                    continue
                local = base[len("compolab.") :] if base != "compolab" else ""
                subs = [f"{local}.{n}".strip(".") for n in names if f"{local}.{n}".strip(".") in modules]
                targets.update(subs or [local])
        graph[name] = targets - {name}
    return graph


def _full(module: str) -> str:
    return f"compolab.{module}".rstrip(".")


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or (entry.endswith(".*") and (module + ".").startswith(entry[:-1])):
                return i
    raise AssertionError(f"compolab.{module} is in no layer of tests/test_layout.py: add it to LAYERS")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "methods" in graph["config"]  # module-level import
    assert "probes" in graph[""]  # the public API
    assert graph["errors"] == set()


def test_the_import_graph_is_acyclic():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(_full(m) for m in cycle)


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{_full(src)} (layer {_layer(src)}) imports {_full(dst)} (layer {_layer(dst)})"
        for src, targets in import_graph().items()
        for dst in targets
        if _layer(dst) > _layer(src)
    ]
    assert upward == []


@pytest.mark.parametrize("path", sorted((ROOT / "methods").glob("*.py")), ids=lambda p: p.name)
def test_method_modules_stay_under_300_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 300


#: Quoted method names allowed outside ``compolab/methods/``: ``compolab bench tmc`` (a CLI
#: choice, and the benchmark it picks) and the name of the card field where a TMC pool keeps its
#: base-head seed (stored format).
ALLOWED = {("cli/parser.py", "tmc"), ("cli/commands.py", "tmc"), ("tmc.py", "tmc")}


def test_no_method_name_is_quoted_outside_methods():
    names = {"ita", "iel", "tmc", "seq", "naive", "ewc", "joint"}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("methods/"):
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if tok.type != tokenize.STRING:
                continue
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # f-strings
                continue
            if value in names and (rel, value) not in ALLOWED:
                found.append(f"{rel}:{tok.start[0]}: {tok.string}")
    assert found == []


# --------------------------------------------------------------------------- the read side

CLI = ROOT / "cli" / "commands.py"


def _cli_function_imports(function: str) -> set[str]:
    """The kit modules a function of ``cli/commands.py`` imports, with those of the helpers it calls
    (``_runtime``, ...), followed to the end."""
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    modules = _modules()
    seen, todo, found = set(), [function], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compolab"):
                base = node.module[len("compolab.") :] if node.module != "compolab" else ""
                subs = [f"{base}.{a.name}".strip(".") for a in node.names]
                found.update([s for s in subs if s in modules] or [base])
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
                todo.append(node.func.id)
    return found


def _reached(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """Every module reached from ``starts`` along imports (function-level ones included)."""
    reached, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph.get(node, ()))
    return reached


@pytest.mark.parametrize("command", ["cmd_compose", "cmd_probe"])
def test_reading_a_pool_from_the_cli_never_enters_the_run_driver(command):
    starts = _cli_function_imports(command)
    reached = _reached(import_graph(), starts)
    assert "workspace" in reached and "pool" in reached  # the walk is real: it reads a pool
    assert "run" not in reached and "" not in reached, sorted(reached)


@pytest.mark.parametrize("module", ["workspace", "measure", "probes.command", "explore.engine"])
def test_the_read_side_never_enters_the_run_driver(module):
    reached = _reached(import_graph(), {module})
    assert "run" not in reached and "" not in reached, sorted(reached)


def test_the_cli_walk_follows_helpers():
    assert "distributed" in _cli_function_imports("cmd_probe")  # through the helper _finish_ranks
    assert "run" in _cli_function_imports("cmd_train")  # training does enter the driver


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_over_400_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 400


def test_no_notebook_calls_the_cli():
    """Notebooks call the library (``compose_and_evaluate``, ``run``), never ``cli.main``."""
    import json

    found = []
    for nb in sorted((ROOT.parent / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "code" and "cli.main" in "".join(cell["source"]):
                found.append(f"{nb.name} cell {i}")
    assert found == []
