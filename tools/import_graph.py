"""The package's import graph, drawn from the code, and checked against its layers.

    python -m tools.import_graph              # every module's imports, by layer (text)
    python -m tools.import_graph --mermaid    # the diagram docs/method.md shows
    python -m tools.import_graph --write-doc  # put that diagram into docs/method.md

Every import of one ggufjac module by another counts, wherever it is written: at the top,
inside a function (a deferred import is still a dependency) and under `if TYPE_CHECKING:`
(a type a module names is part of what it depends on, and a circle through annotations is
still a circle for a reader). Each module belongs to one layer of `LAYERS`, lowest first; an
import may point to a module of a lower layer or of the same one, never up, and the graph
has no circle. The command exits with status 1, naming each offence, when either is broken.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ggufjac"
DOC = ROOT / "docs" / "method.md"
DOC_BEGIN = "<!-- import graph: drawn by `python -m tools.import_graph --write-doc` -->"
DOC_END = "<!-- end of import graph -->"

# The layers, lowest first: a module may import from its own layer and the ones before it.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("errors", "units", "threads", "outputs", "run_settings"),
    "file": ("gguf_file", "quants", "native_quants", "quantized_products", "resolve",
             "vocab", "chat"),
    "layout": ("families", "layout", "activation_formats", "costs"),
    "model and rules": ("linearize", "blocked", "routing", "model"),
    "engine": ("device_weights", "weights", "runner", "engine"),
    "analyses": ("metrics", "analysis", "jacobian", "svd", "layers", "cvector", "components"),
    "llama.cpp": ("llamacpp", "llamacpp_worker", "anchor"),
    "reports of one model": ("model_reports", "plots"),
    "Python API": ("api",),
    "built on the API": ("compare", "steer"),
    "written results": ("reports", "summary"),
    "front ends": ("batch", "prompt_sets", "store", "ray_cluster", "ray_batch", "ray_jacobian",
                   "html", "cli_options", "cli", "__main__"),
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    where: str  # "module", "function" or "type checking"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_modules(node: ast.Import | ast.ImportFrom, package: str,
                      modules: set[str]) -> Iterable[str]:
    """The package's modules an import statement names."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == package and len(parts) > 1:
                yield parts[1]
        return
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != package:
            return
        parts = parts[1:]
    elif node.level == 1:
        parts = node.module.split(".") if node.module else []
    else:
        return  # above the package
    if parts:
        yield parts[0]
    else:  # `from . import a, b`
        for alias in node.names:
            if alias.name in modules:
                yield alias.name


def imports_of(path: Path, package: str, modules: set[str]) -> list[Import]:
    """Every import of another module of the package in one file, with where it is written."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[Import] = []

    def walk(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in _imported_modules(child, package, modules):
                    if name != path.stem:
                        found.append(Import(path.stem, name, child.lineno, where))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    walk(ast.Module(body=[sub], type_ignores=[]), "type checking")
                for sub in child.orelse:
                    walk(ast.Module(body=[sub], type_ignores=[]), where)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, "function" if where == "module" else where)
            else:
                walk(child, where)

    walk(tree, "module")
    return found


def graph(package_dir: Path = PACKAGE) -> tuple[list[str], list[Import]]:
    """The package's modules (sorted) and every import between them."""
    files = sorted(p for p in package_dir.glob("*.py"))
    modules = {p.stem for p in files}
    imports = [i for p in files for i in imports_of(p, package_dir.name, modules)]
    return sorted(modules), imports


def edges(imports: list[Import]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for i in imports:
        out.setdefault(i.importer, set()).add(i.imported)
    return out


def layer_of(layers: dict[str, tuple[str, ...]]) -> dict[str, int]:
    return {m: n for n, members in enumerate(layers.values()) for m in members}


def circles(nodes: list[str], arrows: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(arrows.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(found)


def problems(nodes: list[str], imports: list[Import],
             layers: dict[str, tuple[str, ...]] = LAYERS) -> list[str]:
    """Everything wrong with the graph: modules without a layer (or listed twice, or
    listed but missing), upward imports, circles."""
    found = []
    listed = [m for members in layers.values() for m in members]
    for m in sorted({m for m in listed if listed.count(m) > 1}):
        found.append(f"{m}: listed in more than one layer")
    level = layer_of(layers)
    names = list(layers)
    for m in nodes:
        if m not in level and m != "__init__":
            found.append(f"{m}: in no layer of tools/import_graph.py's LAYERS")
    for m in listed:
        if m not in nodes:
            found.append(f"{m}: in LAYERS but not a module of the package")
    for i in imports:
        if i.importer in level and i.imported in level and \
                level[i.imported] > level[i.importer]:
            found.append(f"{i.importer}.py:{i.line} imports {i.imported} ({i.where}): upward, "
                         f"from layer '{names[level[i.importer]]}' to "
                         f"'{names[level[i.imported]]}'")
    for c in circles(nodes, edges(imports)):
        found.append("circle: " + " <-> ".join(c))
    return found


def transitive_reduction(arrows: dict[str, set[str]]) -> dict[str, set[str]]:
    """The arrows no longer path implies (for an acyclic graph): what the diagram draws."""
    reach: dict[str, set[str]] = {}

    def reachable(v: str) -> set[str]:
        if v not in reach:
            reach[v] = set()
            for w in arrows.get(v, ()):
                reach[v] |= {w} | reachable(w)
        return reach[v]

    return {v: {w for w in ws if not any(w in reachable(u) for u in ws - {w})}
            for v, ws in arrows.items()}


def render_text(nodes: list[str], imports: list[Import],
                layers: dict[str, tuple[str, ...]] = LAYERS) -> str:
    """Per layer (top first), each module and every module it imports."""
    arrows = edges(imports)
    lines = []
    for name, members in reversed(list(layers.items())):
        lines.append(f"{name}:")
        for m in members:
            if m in nodes:
                lines.append(f"  {m} -> {' '.join(sorted(arrows.get(m, ()))) or '(nothing)'}")
    return "\n".join(lines) + "\n"


def render_mermaid(nodes: list[str], imports: list[Import],
                   layers: dict[str, tuple[str, ...]] = LAYERS) -> str:
    """A mermaid flowchart: one box per layer (top first), the arrows of the transitive
    reduction (an arrow a longer path already implies is left out)."""
    arrows = transitive_reduction(edges(imports))
    lines = ["```mermaid", "flowchart TD"]
    for n, (name, members) in reversed(list(enumerate(layers.items()))):
        lines.append(f'  subgraph L{n}["{name}"]')
        lines.extend(f"    {m.strip('_')}[{m}]" for m in members if m in nodes)
        lines.append("  end")
    for v in sorted(arrows):
        for w in sorted(arrows[v]):
            lines.append(f"  {v.strip('_')} --> {w.strip('_')}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def doc_block(text: str) -> str | None:
    """The diagram between the markers in docs/method.md (None: no markers)."""
    if DOC_BEGIN not in text or DOC_END not in text:
        return None
    return text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mermaid", action="store_true", help="print the mermaid diagram")
    ap.add_argument("--write-doc", action="store_true",
                    help="replace the diagram in docs/method.md with the present one")
    args = ap.parse_args(argv)
    nodes, imports = graph()
    diagram = render_mermaid(nodes, imports)
    if args.write_doc:
        text = DOC.read_text(encoding="utf-8")
        if doc_block(text) is None:
            print(f"{DOC}: no markers {DOC_BEGIN!r} ... {DOC_END!r}", file=sys.stderr)
            return 1
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        DOC.write_text(head + DOC_BEGIN + "\n" + diagram + DOC_END + tail, encoding="utf-8")
    print(diagram if args.mermaid else render_text(nodes, imports), end="")
    found = problems(nodes, imports)
    for p in found:
        print(p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
