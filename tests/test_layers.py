"""The architecture as a test: testbed's packages import one way only, and nothing cycles.

Layers, top to bottom: cli -> report -> scenario -> run -> plan -> emu -> testbed.errors; a
module may import its own layer and those below, never above, and never through the lazy
`testbed` facade. nodes/ (the node processes) never imports testbed/. Every import counts for
the layers: module level, inside functions, under TYPE_CHECKING. The graph of the imports that
run (all but TYPE_CHECKING's, which only name a type for an annotation) has no cycle.
Both checks are shown to fail on a planted upward import and a planted cycle.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["errors", "emu", "plan", "run", "scenario", "report", "cli"]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import statements under `if TYPE_CHECKING:`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(root: Path, path: Path, modules: set[str], typing: bool = True) -> set[str]:
    """Every sledge module `path` imports (a `from pkg import mod` names the submodule);
    typing=False leaves out those under TYPE_CHECKING."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m.split(".")[0] in ("testbed", "nodes")}


def layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[0] != "testbed" or len(parts) == 1:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def violations(root: Path) -> list[str]:
    files = sorted([*root.glob("testbed/**/*.py"), *root.glob("nodes/**/*.py")])
    modules = {module_name(root, f) for f in files}
    graph = nx.DiGraph()
    bad = []
    for f in files:
        me = module_name(root, f)
        graph.add_node(me)
        for dep in sorted(imports_of(root, f, modules)):
            if me.startswith("nodes") and dep.startswith("testbed"):
                bad.append(f"{me} imports {dep}: nodes/ never imports testbed/")
            if me.startswith("testbed.") and dep == "testbed":
                bad.append(f"{me} imports the `testbed` facade: import the module itself")
            mine, theirs = layer(me), layer(dep)
            if mine == -1:
                bad.append(f"{me}: module outside the layers {LAYERS}")
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{me} ({LAYERS[mine]}) imports {dep} ({LAYERS[theirs]}): upward")
        for dep in imports_of(root, f, modules, typing=False):
            if not me.startswith(dep + "."):  # a package's submodule needs its package anyway
                graph.add_edge(me, dep)
    bad += [f"import cycle: {' -> '.join([*c, c[0]])}" for c in nx.simple_cycles(graph)]
    return bad


def test_imports_run_one_way_and_nothing_cycles():
    assert violations(ROOT) == []


def _copy(tmp_path: Path) -> Path:
    for pkg in ("testbed", "nodes"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_planted_upward_import_is_caught(tmp_path):
    root = _copy(tmp_path)
    target = root / "testbed/emu/linkmodel.py"
    target.write_text(target.read_text() + "\n\ndef late():\n    from testbed.cli import main\n")
    found = violations(root)
    assert any("testbed.emu.linkmodel (emu) imports testbed.cli.main (cli): upward" in v
               for v in found), found


def test_a_planted_cycle_and_a_node_importing_testbed_are_caught(tmp_path):
    root = _copy(tmp_path)
    # plan.runplan already imports plan.config; the reverse closes a cycle in one layer
    cfg = root / "testbed/plan/config.py"
    cfg.write_text(cfg.read_text() + "\n\nif False:\n    import testbed.plan.runplan\n")
    node = root / "nodes/data.py"
    node.write_text(node.read_text() + "\n\nif False:\n    import testbed.errors\n")
    found = violations(root)
    assert any(v.startswith("import cycle:") and "testbed.plan.config" in v for v in found), found
    assert any("nodes.data imports testbed.errors" in v for v in found), found
