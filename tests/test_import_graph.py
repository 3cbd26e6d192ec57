"""No import cycles between the modules of `vadclip` and `study` (design: data flows one way).

`lint-imports` (pyproject's [tool.importlinter], run by .ci/run) checks the layers, the forbidden imports and
`acyclic_siblings`: no cycle between the children of any package. That contract does not see a cycle between a
package's `__init__` and its own submodules; this test does, on the same graph (grimp, import-linter's graph
library: imports inside functions count, those under `if TYPE_CHECKING:` do not)."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")  # a dependency of import-linter, in the `dev` extra


def import_cycles(graph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def describe(graph, cycle: list[str]) -> str:
    """One cycle as a chain of imports with their line numbers, `a -> b (l.3) -> ... -> a`."""
    first, members = cycle[0], set(cycle)
    way_back = [m for m in sorted(graph.find_modules_that_directly_import(first)) if m in members]
    chain = graph.find_shortest_chain(importer=first, imported=way_back[0]) + (first,)
    steps = []
    for importer, imported in zip(chain, chain[1:]):
        details = graph.get_import_details(importer=importer, imported=imported)
        lines = ",".join(str(d["line_number"]) for d in details) or "?"
        steps.append(f"{importer} -> {imported} (l.{lines})")
    return "; ".join(steps)


def test_cycle_finder_reports_a_cycle_and_ignores_a_chain():
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c", "p.d"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b", line_number=1, line_contents="import p.b")
    graph.add_import(importer="p.b", imported="p.c", line_number=2, line_contents="import p.c")
    graph.add_import(importer="p.c", imported="p.a", line_number=3, line_contents="import p.a")
    graph.add_import(importer="p.c", imported="p.d", line_number=4, line_contents="import p.d")
    cycles = import_cycles(graph, set(graph.modules))
    assert cycles == [["p.a", "p.b", "p.c"]]
    assert describe(graph, cycles[0]) == "p.a -> p.b (l.1); p.b -> p.c (l.2); p.c -> p.a (l.3)"


def test_no_import_cycles_in_vadclip_and_study():
    graph = grimp.build_graph("vadclip", "study", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.split(".")[0] in ("vadclip", "study")}
    assert len(modules) > 40
    cycles = import_cycles(graph, modules)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)
