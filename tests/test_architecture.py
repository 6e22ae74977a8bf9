"""The package's seams (issue 11): no import cycle, one definition of each cost function, no list of
expert back-end names outside their registry.

The import graph is read from the source (every `import moe_lab...` and `from moe_lab... import`,
at module level and inside functions: a cycle closed by an import inside a function is still a
cycle), so the test needs neither Triton nor a GPU.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moe_lab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from pkg import submodule` depends on the submodule (a package's __init__ always runs
                # first, which Python handles); `from module import name` on the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "moe_lab.kernels.moe" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_cost_function_is_defined_once():
    from moe_lab import cost, profiling, tiling

    for name in ("moe_flops", "moe_bytes", "expected_active_experts", "arithmetic_intensity", "dense_equal_flops_shape"):
        assert getattr(profiling, name) is getattr(cost, name), name
    assert tiling.max_padded_rows is cost.max_padded_rows
    defined = {}
    for path in PKG.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in vars(cost) and callable(vars(cost)[node.name]) \
                    and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert {n: p for n, p in defined.items() if p != ["moe_lab/cost.py"]} == {}


def test_the_kernels_cost_names_are_the_cost_modules():
    pytest.importorskip("triton")
    from moe_lab import cost
    from moe_lab.kernels import intro, moe_routing

    for name in ("add_flops", "add_bytes", "softmax_flops", "softmax_bytes", "matmul_flops", "matmul_bytes",
                 "arithmetic_intensity"):
        assert getattr(intro, name) is getattr(cost, name), name
    assert moe_routing.max_padded_rows is cost.max_padded_rows


def test_no_list_of_backend_names_outside_the_registry():
    """A tuple or list literal holding two or more back-end names is a second owner of the names."""
    names = {"reference", "sorted", "grouped_mm", "padded", "triton", "ep"}
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "expert_backends.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                found = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names}
                if len(found) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(found)}")
    assert offenders == []


def test_notebook_sizes_live_beside_the_presets_for_every_mode():
    from moe_lab.config import NOTEBOOK_SIZES, notebook_sizes

    for nb, entries in NOTEBOOK_SIZES.items():
        for name, per_mode in entries.items():
            assert set(per_mode) == {"gpu", "cpu", "ci"}, (nb, name)
    assert notebook_sizes("05", "ci")["matmul"] == (127, 95, 131)
    with pytest.raises(ValueError, match="notebook='99'"):
        notebook_sizes("99", "cpu")
    with pytest.raises(ValueError, match="mode='tpu'"):
        notebook_sizes("05", "tpu")
    inline = []  # a cell that picks a size by indexing a dict literal with the mode
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and "mode" in ast.unparse(node.slice):
                inline.append(f"{path.name}:{node.lineno}")
    assert inline == []
