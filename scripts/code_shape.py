"""The code's shape: the largest classes and functions, and cycles in the project's import graph.

    python scripts/code_shape.py [--json scripts/results/code_shape.json]

Counts lines from a definition's first to its last line (docstrings and comments included).
The import graph joins modules of ``edge_runtime`` and ``broker_server`` by every import, at the
top of a file or inside a function (not those under ``if TYPE_CHECKING``); a cycle is a strongly connected set of more than one module,
and package-level cycles are reported too (``edge_runtime`` <-> ``broker_server``).
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "broker_server")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def sizes(mods: dict[str, Path]) -> tuple[list, list]:
    classes, functions = [], []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno}:{node.name}"))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], int]:
    graph: dict[str, set[str]] = defaultdict(set)
    inside = 0
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import submodule`` depends on the submodule; ``from mod import name`` on mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            found = [t for t in targets if t in mods and t != name]
            if not found or _type_checking_only(tree, node):   # type hints only: not a dependency at run time
                continue
            if id(node) not in top:
                inside += 1
            graph[name].update(found)
    return graph, inside


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    mods = modules()
    classes, functions = sizes(mods)
    graph, inside = imports(mods)
    found = cycles(graph)
    pkg_edges = sorted({(a.split(".")[0], b.split(".")[0]) for a, bs in graph.items() for b in bs
                        if a.split(".")[0] != b.split(".")[0]})
    print("largest classes:", *(f"  {n:4d}  {c}" for n, c in classes[:args.top]), sep="\n")
    print("largest functions:", *(f"  {n:4d}  {f}" for n, f in functions[:args.top]), sep="\n")
    print(f"classes over 250 lines: {sum(n > 250 for n, _ in classes)}; functions over 60 lines: "
          f"{sum(n > 60 for n, _ in functions)}")
    print(f"project imports inside functions: {inside}")
    print(f"package edges: {pkg_edges}")
    print(f"import cycles ({len(found)}):", *(f"  {' <-> '.join(c)}" for c in found), sep="\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "classes": classes[:args.top], "functions": functions[:args.top],
            "classes_over_250": sum(n > 250 for n, _ in classes), "functions_over_60": sum(n > 60 for n, _ in functions),
            "imports_inside_functions": inside, "package_edges": pkg_edges, "cycles": found}, indent=1))


if __name__ == "__main__":
    main()
