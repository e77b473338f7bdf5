"""The package's structure: every import points down the declared layers, there is no circle,
and docs/method.md shows the import graph as the code has it (tools/import_graph.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tools import import_graph

ROOT = Path(__file__).resolve().parent.parent


def test_every_import_points_down_and_none_closes_a_circle() -> None:
    nodes, imports = import_graph.graph()
    assert {"api", "engine", "reports", "cli"} <= set(nodes)  # the package was read
    assert import_graph.problems(nodes, imports) == []


def test_the_command_passes_on_the_package() -> None:
    run = subprocess.run([sys.executable, "-m", "tools.import_graph"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "engine ->" in run.stdout


def test_the_engine_and_the_spectra_do_not_reach_llama_cpp() -> None:
    """What `import ggufjac.engine` or `ggufjac.analysis` loads, in a fresh interpreter:
    neither the llama.cpp glue nor anything above the analyses."""
    code = ("import sys, ggufjac.engine, ggufjac.analysis; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('ggufjac.'))))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded = set(run.stdout.split())
    assert "ggufjac.engine" in loaded
    assert not loaded & {"ggufjac.llamacpp", "ggufjac.anchor", "ggufjac.api",
                         "ggufjac.reports", "ggufjac.model_reports"}, loaded


def test_docs_show_the_present_graph() -> None:
    nodes, imports = import_graph.graph()
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    shown = import_graph.doc_block(text)
    assert shown is not None, "docs/method.md has no import graph markers"
    assert shown == import_graph.render_mermaid(nodes, imports), \
        "docs/method.md's import graph is stale: python -m tools.import_graph --write-doc"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name, body in files.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(body))
    return pkg


def test_the_checker_finds_a_circle_through_deferred_and_type_only_imports(tmp_path) -> None:
    pkg = _package(tmp_path, {
        "low": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from .high import Thing
            """,
        "high": """
            def f():
                from . import low
            """,
        "other": "import os\n"})
    nodes, imports = import_graph.graph(pkg)
    by_pair = {(i.importer, i.imported): i.where for i in imports}
    assert by_pair == {("low", "high"): "type checking", ("high", "low"): "function"}
    layers = {"bottom": ("low", "other"), "top": ("high",)}
    found = import_graph.problems(nodes, imports, layers)
    assert "circle: high <-> low" in found
    assert any(p.startswith("low.py:4 imports high (type checking): upward") for p in found)
    assert len(found) == 2


def test_the_checker_names_modules_outside_the_layers(tmp_path) -> None:
    pkg = _package(tmp_path, {"a": "from pkg import b\n", "b": "", "c": ""})
    nodes, imports = import_graph.graph(pkg)
    assert [(i.importer, i.imported) for i in imports] == [("a", "b")]
    found = import_graph.problems(nodes, imports, {"one": ("a", "b", "gone")})
    assert sorted(found) == ["c: in no layer of tools/import_graph.py's LAYERS",
                             "gone: in LAYERS but not a module of the package"]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """Every string constant in a module's code (docstrings and f-string parts included)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_layer_tensor_names_are_built_in_one_place_as_gguf_names_them() -> None:
    from gguf.constants import TENSOR_NAMES

    from ggufjac.layout import LAYER_TENSORS, layer_tensor_name

    gguf_names = {template.format(bid=7) + ".weight" for template in TENSOR_NAMES.values()}
    stored = {t.name for t in LAYER_TENSORS} | {t.fused[1] for t in LAYER_TENSORS if t.fused}
    assert {layer_tensor_name(7, n) for n in stored} <= gguf_names
    builders = [(p.name, line) for p in sorted((ROOT / "ggufjac").glob("*.py"))
                if p.name != "layout.py"
                for line, text in _string_constants(p) if text.startswith("blk.")]
    assert builders == [], "tensor names are built with layout.layer_tensor_name"


def test_metadata_keys_come_from_gguf_constants() -> None:
    """No module spells a general.* or tokenizer.* key itself (gguf.constants.Keys does)."""
    spelled = [(p.name, line, text) for p in sorted((ROOT / "ggufjac").glob("*.py"))
               for line, text in _string_constants(p)
               if text.startswith(("general.", "tokenizer.ggml."))]
    assert spelled == []
