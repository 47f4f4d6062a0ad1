"""The packages' import structure: one direction (dynamics ← experiments ← analyses ←
paper_figures), no cycles, no torch in the theory, and the curated public API.

The graph is read from the source (every ``import`` statement, module level or inside a
function); ``from pkg import name`` is an edge to the module ``pkg.name`` when that is a
module, else to ``pkg``."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynamics", "experiments", "analyses", "paper_figures")
RANK = {name: i for i, name in enumerate(PACKAGES)}


def _modules():
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path, modules):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def import_graph():
    modules = _modules()
    return {m: {t for t in _imports(p, modules) if t in modules and t != m} for m, p in modules.items()}, modules


def find_cycle(graph):
    """One cycle as a list of modules, or None (iterative DFS with colours)."""
    colour, parent = {}, {}
    for root in graph:
        if root in colour:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = "grey"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = "black"
                stack.pop()
            elif colour.get(child) == "grey":
                cycle, at = [child], node
                while at != child:
                    cycle.append(at)
                    at = parent[at]
                return cycle[::-1]
            elif child not in colour:
                colour[child], parent[child] = "grey", node
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_find_cycle_finds_a_constructed_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 40  # the walk saw the packages
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_flow_one_way():
    graph, _ = import_graph()
    wrong = [(m, t) for m, targets in graph.items() for t in targets
             if RANK[t.split(".")[0]] > RANK[m.split(".")[0]]]
    assert not wrong, f"imports against dynamics <- experiments <- analyses <- paper_figures: {wrong}"


def test_theory_imports_no_torch():
    _, modules = import_graph()
    for name, path in modules.items():
        if name.startswith("dynamics"):
            assert not {i.split(".")[0] for i in _imports(path, modules)} & {"torch", "experiments"}, name


@pytest.mark.parametrize("package", ["dynamics", "experiments", "experiments.runs", "experiments.trace",
                                     "experiments.sweeps", "experiments.linking", "dynamics.nqm"])
def test_public_api_names_exist_and_are_defined_in_the_package(package):
    mod = importlib.import_module(package)
    assert mod.__all__ and sorted(mod.__all__) == sorted(set(mod.__all__))
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj):  # a function or class of this project, not a borrowed one
            assert obj.__module__.startswith(package.split(".")[0]), (package, name)
    assert "__getattr__" not in vars(mod)


def test_the_top_level_api():
    from experiments import RunConfig, Tracer, collect, link, load_run, run, run_sweep, train  # noqa: F401
    from dynamics import layer_prediction, spectral_radius, stability_edge  # noqa: F401
    import experiments

    assert callable(experiments.run) and callable(experiments.link)
