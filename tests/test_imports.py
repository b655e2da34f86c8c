"""The layers hold and no import cycle exists, between packages or inside one.

``make test`` runs import-linter's contracts (``[tool.importlinter]`` in pyproject.toml:
api above workers above service, the core free of rq/redis/fastapi); a layers contract
does not see a cycle inside one package (``service.pipeline`` <-> ``service.report``), so
this module finds every strongly connected component of the import graph grimp builds
(function-level imports included) and fails on any with more than one module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "workers", "service", "bench")


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The import cycles among ``modules``: each strongly connected component of more
    than one module (Tarjan's algorithm, iterative so a deep graph cannot overflow)."""
    adj = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(adj[v]):
                work.append((v, i + 1))
                w = adj[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def test_no_import_cycle_anywhere():
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    found = cycles(graph, set(graph.modules))
    assert not found, "import cycles (move the shared function to where its callers are):\n" + (
        "\n".join(" <-> ".join(c) for c in found)
    )


def test_the_cycle_check_finds_a_cycle_inside_one_package(tmp_path, monkeypatch):
    """The check itself can fail: a package whose two modules import each other through
    a function-level import, and a three-module ring, are both reported."""
    pkg = tmp_path / "ringpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import ringpkg.b\n")
    (pkg / "b.py").write_text("def f():\n    from ringpkg import a\n")
    (pkg / "c.py").write_text("import ringpkg.d\n")
    (pkg / "d.py").write_text("import ringpkg.e\n")
    (pkg / "e.py").write_text("import ringpkg.c\n")
    (pkg / "f.py").write_text("import ringpkg.a\n")  # imports into a cycle, not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("ringpkg", cache_dir=None)
    found = cycles(graph, set(graph.modules))
    assert sorted(found) == [["ringpkg.a", "ringpkg.b"], ["ringpkg.c", "ringpkg.d", "ringpkg.e"]]


def test_the_layer_contracts_hold():
    """import-linter, as ``make test`` runs it (the same contracts, kept)."""
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") == 3, out.stdout
