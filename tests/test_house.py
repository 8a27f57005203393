"""The package's structure: folders by concern, each saying its job, no import circle, and the
public import path that every exported model card prints."""
import ast
from pathlib import Path

import proxsparse_core

PKG = Path(proxsparse_core.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every proxsparse_core module this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxsparse_core"):
            found.add(node.module)
            for alias in node.names:       # `from proxsparse_core.models import loading`
                if (PKG.parent / (node.module + "." + alias.name).replace(".", "/")).with_suffix(".py").exists():
                    found.add(node.module + "." + alias.name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("proxsparse_core")}
    return found


def test_every_folder_says_its_job_in_its_init():
    folders = [p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert len(folders) >= 6
    for folder in folders:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 3, folder.name


def test_no_module_of_the_core_imports_another_that_imports_it_back():
    graph = {_module(p): _imports(p) for p in PKG.rglob("*.py")}
    # a package's __init__ that re-exports its own modules is not a circle of code
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", "import circle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_core_never_imports_gradio():
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(str(n).split(".")[0] == "gradio" for n in names), p


def test_model_cards_name_a_public_path_that_works():
    from proxsparse_core import export as public
    from proxsparse_core.runs import export, report

    assert public.load_with_masks is export.load_with_masks
    card = report.model_card({"verified": True, "result": "proxsparse", "method": "proxsparse",
                              "model_label": "m", "base_model": "m", "perplexity": {}, "mask_stats": {}},
                             "proxsparse")
    assert "from proxsparse_core.export import load_with_masks" in card


def test_the_core_stands_on_at_most_eight_floors():
    """Rooms are the core's folders and its top-level modules; a room's floor is one above the highest
    room it imports (at the top or inside a function). The core reads top-down in at most 8 floors."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])
    graph: dict = {}
    for p in PKG.rglob("*.py"):
        r = room(_module(p))
        if r == "proxsparse_core.__main__":     # the entry point (`python -m proxsparse_core`), like app.py
            continue
        graph.setdefault(r, set()).update(room(d) for d in _imports(p) if room(d) != r and d != "proxsparse_core")
    floors: dict = {}

    def floor(r):
        if r not in floors:
            floors[r] = 1 + max((floor(d) for d in graph.get(r, ()) if d in graph), default=0)
        return floors[r]
    top = max(floor(r) for r in graph)
    assert top <= 8, sorted(floors.items(), key=lambda kv: -kv[1])
    assert floors["proxsparse_core.chat"] <= 2 and floors["proxsparse_core.errors"] == 1
    # the CLI and the public export module at most on floor 7, so with the app (and bench) on top of
    # them and the UI the whole tree stays within 8
    assert floors["proxsparse_core.cli"] <= 7 and floors["proxsparse_core.export"] <= 7
