"""Import cycles between upcycle's modules, counting imports inside functions.

Parses every module under a package folder with ``ast`` (no import is run), collects
every import statement wherever it sits (module level, functions, methods), resolves
relative imports and ``from pkg import name`` where ``name`` is a submodule, builds the
module graph and prints its strongly connected components of more than one module.
A submodule importing one of its own packages is not counted (Python imports the
package first anyway).

It then repeats with two wider graphs:

* ``+ plug-in loading``: also what runs without an import statement: a
  package ``__init__`` that calls ``registry.collect`` imports every plug-in module of
  the package (not ``_private`` ones, not ``base``), a ``_LAZY = {attr: ".module"}``
  table imports those modules, and ``importlib.import_module("upcycle.x.y")`` with a
  literal or f-string prefix imports the named module (every module under the prefix);
* ``+ TYPE_CHECKING``: also the imports under ``if TYPE_CHECKING:`` (annotations only, never run).

    python scripts/import_cycles.py [ROOT]   # ROOT: the folder that holds upcycle/ (default: .)

Exit status 1 when the first graph (import statements, functions included) has a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(root: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: set[str], *, type_checking: bool = False):
    """``(imported module, line, inside a function?, under TYPE_CHECKING?)`` for each import of an upcycle
    module in the file; those under ``if TYPE_CHECKING:`` only when ``type_checking``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []

    def resolve(target: str) -> str | None:
        """The longest known module that ``target`` is or lies in."""
        parts = target.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    def record(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else resolve(mod) for a in node.names]
        else:
            return
        found.extend((t, node.lineno, in_function, in_type_checking) for t in targets if t)

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    handle(sub, in_function, True)
                for sub in child.orelse:  # the else branch runs
                    handle(sub, in_function, in_type_checking)
            else:
                handle(child, in_function, in_type_checking)

    def handle(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        record(node, in_function, in_type_checking)
        visit(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
              in_type_checking)

    visit(tree, False, False)
    return [entry for entry in found if type_checking or not entry[3]]


def dynamic_imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Modules this one imports without an import statement (see the module docstring)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called == "collect" and is_package:
                found |= {m for m in modules if m.startswith(name + ".") and "." not in m[len(name) + 1:]
                          and not m.rsplit(".", 1)[1].startswith("_") and not m.endswith(".base")}
            elif called == "import_module" and node.args:
                arg = node.args[0]
                prefix = None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    prefix = arg.value
                elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    prefix = arg.values[0].value.rstrip(".")
                if prefix and prefix.startswith("upcycle"):
                    found |= {m for m in modules if m == prefix or m.startswith(prefix.rstrip(".") + ".")}
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    target = value.value
                    if target.startswith("."):
                        target = package + target
                    if target in modules:
                        found.add(target)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
                    out.append(sorted(component))
    return out


def ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def build(root: Path, *, type_checking: bool, dynamic: bool):
    modules = module_names(root, "upcycle")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edges: dict[tuple[str, str], list[str]] = {}
    counts = {"imports": 0, "in_function": 0}
    for name, path in modules.items():
        found = imports_of(name, path, set(modules), type_checking=type_checking)
        statements = {(line, func) for _, line, func, _ in found}  # one per line: an import statement
        counts["imports"] += len(statements)
        counts["in_function"] += sum(func for _, func in statements)
        for target, line, func, tc in found:
            # a module importing itself or one of its packages is not an edge between modules
            if target == name or target in ancestors(name):
                continue
            graph[name].add(target)
            edges.setdefault((name, target), []).append(
                f"{line}{' (in function)' if func else ''}{' (TYPE_CHECKING)' if tc else ''}")
        if dynamic:
            for target in dynamic_imports(name, path, set(modules)):
                if target != name and target not in ancestors(name):
                    graph[name].add(target)
                    edges.setdefault((name, target), []).append("plug-in loading")
    return modules, graph, edges, counts


def report(title: str, graph, edges) -> int:
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    print(f"{title}: {len(cycles)} import cycle(s) (strongly connected components of 2+ modules)")
    for component in sorted(cycles, key=len, reverse=True):
        print(f"  {len(component)} modules: {', '.join(component)}")
        members = set(component)
        for (a, b), where in sorted(edges.items()):
            if a in members and b in members:
                print(f"    {a} -> {b}  line {', '.join(dict.fromkeys(where))}")
    return len(cycles)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(".")
    modules, graph, edges, counts = build(root, type_checking=False, dynamic=False)
    print(f"{root}: {len(modules)} modules, {counts['imports']} import statements of upcycle modules, "
          f"{counts['in_function']} of them inside functions")
    found = report("import statements (module level and inside functions)", graph, edges)
    _, graph, edges, _ = build(root, type_checking=False, dynamic=True)
    report("+ plug-in loading (registry.collect, _LAZY, import_module): every import that runs", graph, edges)
    _, graph, edges, _ = build(root, type_checking=True, dynamic=True)
    report("+ plug-in loading + TYPE_CHECKING imports (annotations only, never run)", graph, edges)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
