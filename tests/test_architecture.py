"""The layering of docs/architecture.md holds: lint-imports' contracts pass, no module imports another that
imports it back (imports inside functions counted), every module belongs to a layer and is on the page."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _graph():
    return grimp.build_graph("upcycle", exclude_type_checking_imports=True)


def _script():
    """scripts/import_cycles.py, the source-only cycle finder (it also measures old checkouts)."""
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module, ignoring the root package."""
    modules = sorted(m for m in graph.modules if m != "upcycle")
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i != "upcycle"} for m in modules}
    return [c for c in _script().strongly_connected(edges) if len(c) > 1]


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


def test_no_cycle_through_plug_in_loading():
    """What grimp and lint-imports cannot see: a package whose registry imports its plug-in modules
    (``registry.collect``), ``_LAZY`` tables and ``importlib.import_module``. Counted, still no cycle."""
    script = _script()
    _, graph, edges, counts = script.build(ROOT, type_checking=False, dynamic=True)
    assert counts["in_function"] > 0 and ("upcycle.targets", "upcycle.targets.mixtral") in edges
    assert [c for c in script.strongly_connected(graph) if len(c) > 1] == []


def test_cycle_finder_sees_function_level_and_plug_in_cycles(tmp_path, capsys):
    script = _script()
    package = tmp_path / "upcycle"
    (package / "plugins").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import x\n",  # a -> b only inside a function
        "b.py": "from upcycle import a\nx = 1\n",
        "plan.py": "from .plugins import everything\n",
        "registry.py": "def collect(package, attribute):\n    return {}\n",
        "plugins/__init__.py": "from ..registry import collect\n\ndef everything():\n    return collect(__name__, 'P')\n",
        "plugins/one.py": "def f():\n    from upcycle.plan import everything\n",  # back up, via the registry
    }
    for name, text in files.items():
        (package / name).write_text(text)
    assert script.main(["import_cycles.py", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    statements, loading = out.split("+ plug-in loading", 1)[0], out.split("+ plug-in loading", 2)[1]
    assert "1 import cycle(s)" in statements and "upcycle.a, upcycle.b" in statements
    assert "upcycle.a -> upcycle.b  line 2 (in function)" in statements and "upcycle.plan" not in statements
    assert "2 import cycle(s)" in loading
    assert "upcycle.plan, upcycle.plugins, upcycle.plugins.one" in loading
    assert "upcycle.plugins -> upcycle.plugins.one  line plug-in loading" in loading
