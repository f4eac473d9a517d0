"""The layering of docs/architecture.md holds: lint-imports' contracts pass, no module imports another that
imports it back (imports inside functions counted), every module belongs to a layer and is on the page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _graph():
    return grimp.build_graph("upcycle", exclude_type_checking_imports=True)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring the root package."""
    modules = sorted(m for m in graph.modules if m != "upcycle")
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i != "upcycle") for m in modules}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(m):
        index[m] = low[m] = counter[0]
        counter[0] += 1
        stack.append(m)
        on_stack.add(m)
        for n in edges.get(m, []):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_module_imports_another_that_imports_it_back():
    assert _cycles(_graph()) == []


def test_every_module_is_in_a_layer():
    text = (ROOT / "pyproject.toml").read_text()
    layers = text.split("layers = [", 1)[1].split("]", 1)[0]
    named = set(re.findall(r"upcycle\.[\w.]+", layers))
    top = {".".join(m.split(".")[:2]) for m in _graph().modules if m != "upcycle"}
    assert sorted(top - named) == []


def test_lint_imports_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_every_module_is_on_the_architecture_page():
    """docs/architecture.md's table names every top-level module (``name.py``) and package (``name/``)."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "upcycle"
    names = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    names += [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    assert sorted(n for n in names if n not in page) == []
