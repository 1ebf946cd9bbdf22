"""The committed notebooks read like a course: a title cell, one short import cell, and every figure
embedded as an ``image/png`` output (a reader on GitHub sees what the text describes).

Reads the ``.ipynb`` files as JSON and runs nothing; every notebook under ``notebooks/`` is checked.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

#: A code line that draws a figure (comments are ignored).
DRAWS = re.compile(
    r"\bplt\.(show|subplots|figure|plot|imshow|bar|barh|scatter|hist)\b|\.plot\(|\.loglog\(|\.semilogy\("
    r"|\.imshow\(|\.scatter\(|\.bar\(|\.barh\(|\.contourf?\(|\.pcolormesh\(|\bshow_figure\(|\bsavefig\(|\bimage_grid\("
)
MAX_IMPORT_LINES = 3


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _is_install(cell: dict) -> bool:
    return "install" in cell.get("metadata", {}).get("tags", [])


def _python(source: str) -> str:
    """The cell as plain Python: IPython magics and shell escapes become ``pass``."""
    return "\n".join(
        re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines()
    )


def compolab_import_lines(source: str) -> int:
    """How many physical lines of ``source`` belong to imports from ``compolab``."""
    lines = 0
    for node in ast.walk(ast.parse(_python(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        if any(m == "compolab" or m.startswith("compolab.") for m in modules):
            lines += node.end_lineno - node.lineno + 1
    return lines


def draws(source: str) -> bool:
    """True if a non-comment line of the cell draws a figure."""
    return any(DRAWS.search(line) for line in source.splitlines() if not line.lstrip().startswith("#"))


def has_png(cell: dict) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebook found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_cell(path):
    first = _cells(path)[0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be the markdown title cell"
    assert re.search(r"^# \S", _source(first), re.M), f"{path.name}: the title cell has no '# ' heading"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_short_import_cell(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code" and not _is_install(c)]
    assert code, f"{path.name}: no code cell"
    first = compolab_import_lines(_source(code[0]))
    assert 1 <= first <= MAX_IMPORT_LINES, (
        f"{path.name}: the first code cell imports from compolab in {first} lines "
        f"(1 to {MAX_IMPORT_LINES} allowed)"
    )
    later = [i for i, c in enumerate(code[1:], 1) if compolab_import_lines(_source(c))]
    assert not later, f"{path.name}: code cells {later} import from compolab again; import in the first cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_drawing_cell_has_an_image(path):
    cells = [(i, c) for i, c in enumerate(_cells(path)) if c["cell_type"] == "code"]
    assert any(c.get("outputs") for _, c in cells), f"{path.name} was committed without outputs: execute it"
    empty = [i for i, c in cells if draws(_source(c)) and not has_png(c)]
    assert not empty, f"{path.name}: cells {empty} draw a figure but hold no image/png output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_private_citations(path):
    bad = [i for i, c in enumerate(_cells(path)) if "spec §" in _source(c) or "spec } \\S" in _source(c)]
    assert not bad, f"{path.name}: cells {bad} cite 'spec §', a document readers do not have"


def test_the_checks_catch_what_they_should():
    source = "import torch\nfrom compolab import (a,\n    b)\nimport compolab.x as y"
    assert compolab_import_lines(source) == 3
    assert compolab_import_lines("if x:\n    %pip install compolab\nfrom compolab import a") == 1
    assert draws("fig, ax = plt.subplots()\n") and draws("curve.plot(ax)") and not draws("# plt.show()")
    assert not draws("import matplotlib.pyplot as plt\nx = 1")
    assert has_png({"outputs": [{"data": {"image/png": "..."}}]}) and not has_png({"outputs": []})
