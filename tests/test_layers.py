"""The house's import rules, read from the code's own import statements (ast, every import anywhere in a module,
function-local ones included): the library imports none of the apps, torch_xla is imported by the runtime layer
alone, and no project modules import each other in a cycle."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = "xla_diffusion"
APPS = ("data_prep", "eval", "bench")
XLA_LAYER = {"xla_diffusion.runtime", "xla_diffusion.sharding"}


def project_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name → file, for the library, the apps and the top-level scripts (tests excluded)."""
    mods = {}
    for top in (LIBRARY, *APPS):
        for folder, _, files in os.walk(os.path.join(root, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), root)[:-3]
                    name = rel.replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = os.path.join(root, rel + ".py")
    for f in os.listdir(root):
        if f.endswith(".py"):
            mods[f[:-3]] = os.path.join(root, f)
    return mods


def imported_names(module: str, path: str) -> set[str]:
    """Every dotted name an import statement of the module names (for `from a import b`: a and a.b)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{a.name}" for a in node.names}
    return names


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    graph = {}
    for m, path in mods.items():
        targets = set()
        for name in imported_names(m, path):
            parts = name.split(".")
            # the longest prefix that is a project module (`from pkg import mod` names the module itself)
            hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in mods), None)
            if hit and hit != m:
                targets.add(hit)
        graph[m] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_library_imports_no_app():
    mods = project_modules()
    scripts = {m for m, path in mods.items() if os.path.dirname(path) == ROOT}  # demo.py, the trainer entry
    upward = {m: sorted(t for t in targets if t.split(".")[0] in APPS or t in scripts)
              for m, targets in import_graph(mods).items() if m.split(".")[0] == LIBRARY}
    assert {m: t for m, t in upward.items() if t} == {}


def test_only_the_runtime_layer_imports_torch_xla():
    mods = project_modules()
    importers = {m for m, path in mods.items()
                 if any(n == "torch_xla" or n.startswith("torch_xla.") for n in imported_names(m, path))}
    assert importers <= XLA_LAYER and "xla_diffusion.runtime" in importers


def test_no_import_cycles():
    assert find_cycle(import_graph(project_modules())) is None


def test_the_checks_can_fail(tmp_path):
    """The same walkers on a made-up tree with an upward import, a stray torch_xla import and a cycle."""
    (tmp_path / LIBRARY).mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / LIBRARY / "__init__.py").write_text("")
    (tmp_path / LIBRARY / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / LIBRARY / "b.py").write_text("from xla_diffusion.a import f\nimport torch_xla.core\n")
    (tmp_path / LIBRARY / "c.py").write_text("from eval import tool\n")
    (tmp_path / "eval" / "tool.py").write_text("")
    mods = project_modules(str(tmp_path))
    graph = import_graph(mods)
    assert graph["xla_diffusion.c"] == {"eval.tool"}
    assert "torch_xla.core" in imported_names("xla_diffusion.b", mods["xla_diffusion.b"])
    assert find_cycle(graph) == ["xla_diffusion.a", "xla_diffusion.b", "xla_diffusion.a"]
