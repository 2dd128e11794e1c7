"""The floor plan: no import circle, no folder of prefixed files, every package folder described in
docs/design.md, every module opening with a docstring (read from the source with ast)."""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "launch", "sharding")
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
           for top in PACKAGES for p in sorted((ROOT / top).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (function-level too; not those
    under ``if TYPE_CHECKING:``, which never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from a.b import c` imports a.b, and a.b.c when c is a module.
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _circle() -> list[str]:
    """One import circle as a path of modules, or [] (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if not state.get(nxt) and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(GRAPH):
        if not state.get(node) and (found := visit(node)):
            return found
    return []


def test_the_import_graph_has_no_circle():
    assert len(GRAPH) > 50 and sum(map(len, GRAPH.values())) > 100   # the parse sees the code
    assert _circle() == [], " -> ".join(_circle())


def test_the_search_finds_a_circle_when_there_is_one(monkeypatch):
    monkeypatch.setitem(GRAPH, "sharding.files", GRAPH["sharding.files"] | {"launch.cli"})
    circle = _circle()
    assert circle[0] == circle[-1] and "launch.cli" in circle and "sharding.files" in circle


def test_dependencies_point_launch_trainer_sharding():
    """launch -> trainer -> sharding, never back (docs/design.md)."""
    order = {"launch": 0, "trainer": 1, "sharding": 2}
    back = {(a, b) for a, targets in GRAPH.items() for b in targets
            if order[b.split(".")[0]] < order[a.split(".")[0]]}
    assert back == set()
    ray = [m for m, p in MODULES.items() if not m.startswith("launch") and re.search(
        r"^\s*(import ray\b|from ray[. ])", p.read_text(), re.M)]
    assert ray == []     # trainer and sharding never import Ray


def test_no_folder_holds_a_family_of_prefixed_files():
    """Three or more files named ``foo.py`` / ``foo_*.py`` in one folder ask for a ``foo/``."""
    families = {}
    for folder in {p.parent for p in MODULES.values()}:
        stems = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
        counts = Counter(s.split("_")[0] for s in stems)
        families.update({f"{folder.relative_to(ROOT)}/{prefix}_*": n
                         for prefix, n in counts.items() if n >= 3})
    assert families == {}


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in [*MODULES.values(), ROOT / "configs/__init__.py"]
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert missing == []


def test_design_doc_describes_every_package_folder():
    text = (ROOT / "docs" / "design.md").read_text()
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"^([a-z_]+(?:/[a-z_]+)*)/ ", layout, re.M))
    folders = {str(p.parent.relative_to(ROOT)) for p in MODULES.values()} | {"configs"}
    assert folders - described == set()
    assert {d for d in described if not (ROOT / d).is_dir()} == set()   # no stale folder named
