"""The package's seams: rooms by role, no import cycle, one definition of each cost function, no list
of expert back-end names outside their registry.

Rooms (README, "Layout"): core/ is the ground floor (imports nothing else of the package); the
library (data, model, kernels, distributed, training, open_weights) never imports studies/, course/ or commands/;
nothing imports commands/ but the command line (moe_lab/__main__.py names them as strings).

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


def test_each_cost_function_is_defined_once_and_read_from_its_owner():
    """cost.py defines every cost function; no other module re-exports one (an extra door), and the
    package, the notebooks and the tests reach them as moe_lab.core.cost."""
    from moe_lab.core import cost

    public = {n for n, v in vars(cost).items() if callable(v) and not n.startswith("_")
              and getattr(v, "__module__", "") == cost.__name__} | {"INTERMEDIATE_TRAFFIC"}
    defined, doors = {}, []
    for path in PKG.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name in public:
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert {n: p for n, p in defined.items() if p != ["moe_lab/core/cost.py"]} == {}
    files = list(PKG.rglob("*.py")) + list((ROOT / "notebooks").glob("[0-9][0-9]_*.py")) + list((ROOT / "tests").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   and (getattr(n, "module", None) or "moe_lab").startswith("moe_lab") for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in public and isinstance(node.value, ast.Name) \
                    and node.value.id in modules - {"cost"}:
                doors.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_lab") \
                    and node.module != "moe_lab.core.cost" and any(a.name in public for a in node.names):
                doors.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
    assert doors == [], "cost functions reached through another module:\n" + "\n".join(doors)


ROOMS = {  # room -> the rooms it may import
    "core": {"core"},
    "library": {"core", "library"},
    "studies": {"core", "library", "studies"},
    "course": {"core", "library", "studies", "course"},
    "commands": {"core", "library", "studies", "course", "commands"},
}
LIBRARY = {"data", "model", "kernels", "distributed", "training", "open_weights"}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("__main__",):
        return "top"
    return "library" if parts[1] in LIBRARY else parts[1]


def test_every_module_stands_in_a_room_and_at_most_three_stand_loose():
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert len(loose) <= 3, loose
    rooms = {room(m) for m in import_graph()} - {"top"}
    assert rooms == set(ROOMS), rooms


def arrows_against_the_rooms(graph: dict) -> list:
    """Imports that run against the rooms: upwards, into commands, or from the ground floor to the
    package's face (moe_lab/__init__.py sets the thread policy before torch loads: core may read it)."""
    bad = []
    for name, edges in graph.items():
        if room(name) == "top":
            continue
        for target in edges:
            if room(target) == "top":
                if target != "moe_lab":
                    bad.append(f"{name} -> {target}")
            elif room(target) not in ROOMS[room(name)]:
                bad.append(f"{name} -> {target}")
    return sorted(bad)


def test_the_rooms_import_only_downwards():
    """The ground floor imports nothing else of the package; the library never imports studies,
    course or commands; nothing imports commands."""
    bad = arrows_against_the_rooms(import_graph())
    assert bad == [], "imports that run against the rooms:\n" + "\n".join(bad)


def test_the_room_checker_sees_planted_arrows():
    graph = {"moe_lab.training.loop": {"moe_lab.course.plots"}, "moe_lab.core.config": {"moe_lab.model.moe"},
             "moe_lab.course.plots": {"moe_lab.commands.lab"}, "moe_lab.studies.bench": {"moe_lab.model.moe"}}
    assert arrows_against_the_rooms(graph) == ["moe_lab.core.config -> moe_lab.model.moe",
                                               "moe_lab.course.plots -> moe_lab.commands.lab",
                                               "moe_lab.training.loop -> moe_lab.course.plots"]


def test_imports_inside_functions_are_few_and_each_says_why():
    """At most 25 moe_lab imports inside functions, each with a comment on its line or the line above
    (the optional Triton kernels, or a choice made before Triton loads)."""
    rows = []
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.startswith("moe_lab") for m in mods):
                    commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    rows.append((f"{path.relative_to(ROOT)}:{node.lineno}", commented))
    assert len(rows) <= 25, [r for r, _ in rows]
    assert [r for r, c in rows if not c] == []


def test_the_default_device_is_computed_in_one_place():
    offenders = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if '"cuda" if torch.cuda.is_available() else' in p.read_text() and p.name != "runtime.py"]
    assert offenders == []


def test_no_list_of_backend_names_outside_the_registry():
    """A tuple, list or set literal, or a dict's keys, holding two or more back-end names is a second
    owner of the names (the facts live in core/backends.py, their code in model/expert_backends.py)."""
    from moe_lab.core import backends

    names = set(backends.names(functions_only=False))
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name in ("backends.py", "expert_backends.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                found = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
                if len(found) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(found)}")
    assert offenders == []


def test_notebook_sizes_live_beside_the_presets_for_every_mode():
    from moe_lab.core.config import NOTEBOOK_SIZES, notebook_sizes

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
