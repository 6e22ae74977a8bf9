"""Reading a learner's Triton kernel from its source: which loads and stores it makes, with which
masks, and which pointer arithmetic. The kernel checkers of notebooks 05 and 06 use it.

Why read the source? A load that forgot its mask reads past the end of its tensor, but in an
elementwise kernel whose store is masked that read changes no value the checker can see: under
Triton's CPU interpreter it reads whatever follows the tensor, and on a GPU it reads out of bounds
(usually silently). Only the code shows it. Reading the source works the same under the interpreter
and compiled, and depends on no Triton internals: the kernel is found among the names its launcher
uses (a `@triton.jit` object has the Python function as `.fn`), and its source is parsed with `ast`.
Values and guards stay the checkers' main evidence; the source names the mistake they saw, and finds
the one they cannot see.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Access:
    """One `tl.load` or `tl.store` call of a kernel."""
    kind: str  # "load" or "store"
    base: str  # the pointer argument's first name (`a_ptr` in `a_ptr + offs`)
    mask: Optional[str]  # source of the mask argument, with a named mask resolved to its assignment; None: no mask
    other: Optional[str]  # source of `other=` (loads), None when absent
    line: int  # line in the kernel's source


@dataclass(frozen=True)
class KernelSource:
    name: str
    source: str
    params: tuple  # argument names, in order
    block_params: tuple  # tl.constexpr arguments whose name starts with BLOCK
    accesses: tuple  # Access, in source order


def _jit_function(obj) -> Optional[Callable]:
    """The Python function behind a @triton.jit kernel (also through autotune/heuristics wrappers)."""
    seen = 0
    while obj is not None and seen < 5:
        fn = getattr(obj, "fn", None)
        if fn is None:
            return None
        if inspect.isfunction(fn) and type(obj).__module__.startswith("triton"):
            return fn
        obj, seen = fn, seen + 1
    return None


def _names_used(fn: Callable) -> list:
    """Names a Python function (and the lambdas and functions nested in it) refers to, globals and closure."""
    names, codes = [], [fn.__code__]
    while codes:
        code = codes.pop()
        names += list(code.co_names) + list(code.co_freevars)
        codes += [c for c in code.co_consts if inspect.iscode(c)]
    return names


def kernels_of(launcher: Callable) -> list:
    """The @triton.jit kernels a launcher refers to (by global name or closure), parsed; [] if none is found."""
    fn = getattr(launcher, "__wrapped__", launcher)
    if not inspect.isfunction(fn):
        return []
    scope = dict(fn.__globals__)
    if fn.__closure__:
        scope.update({n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__)
                      if _cell_filled(c)})
    found, out = set(), []
    for name in _names_used(fn):
        kernel = _jit_function(scope.get(name))
        if kernel is None or kernel in found:
            continue
        found.add(kernel)
        parsed = parse_kernel(kernel)
        if parsed is not None:
            out.append(parsed)
    return out


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def parse_kernel(kernel: Callable) -> Optional[KernelSource]:
    """Parse a kernel function's source; None when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(kernel))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    fdef = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fdef is None:
        return None
    args = fdef.args.args
    params = tuple(a.arg for a in args)
    blocks = tuple(a.arg for a in args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)
                   and a.arg.upper().startswith("BLOCK"))
    assigned = {}  # name -> source of its (last) assignment, to resolve `mask=mask`
    for node in ast.walk(fdef):
        if isinstance(node, ast.Assign):
            _record(node.targets, node.value, assigned)
    accesses = []
    for node in ast.walk(fdef):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("load", "store") and node.args):
            continue
        kind = node.func.attr
        kw = {k.arg: k.value for k in node.keywords}
        mask_node = kw.get("mask")
        if mask_node is None and len(node.args) > (1 if kind == "load" else 2):
            mask_node = node.args[1 if kind == "load" else 2]
        if mask_node is None and "boundary_check" in kw:  # a block pointer checks its own bounds
            mask_node = kw["boundary_check"]
        other = kw.get("other")
        if other is None and kind == "load" and len(node.args) > 2:
            other = node.args[2]
        mask = None if mask_node is None else _resolve(mask_node, assigned)
        accesses.append(Access(kind, _base_name(node.args[0]), mask,
                               None if other is None else ast.unparse(other), node.lineno))
    accesses.sort(key=lambda a: a.line)
    return KernelSource(fdef.name, source, params, blocks, tuple(accesses))


def _record(targets, value, assigned: dict) -> None:
    for t in targets:
        if isinstance(t, ast.Name):
            assigned[t.id] = value
        elif isinstance(t, ast.Tuple) and isinstance(value, ast.Tuple) and len(t.elts) == len(value.elts):
            for tt, vv in zip(t.elts, value.elts):
                _record([tt], vv, assigned)


def _resolve(node: ast.AST, assigned: dict) -> str:
    """Source of a mask with each name that holds a comparison replaced, one level deep, by its
    assignment (`mask=mask` after `mask = offs < n` gives "offs < n"; `offs` itself stays)."""
    class Inline(ast.NodeTransformer):
        def visit_Name(self, n):
            if n.id in assigned and any(isinstance(c, ast.Compare) for c in ast.walk(assigned[n.id])):
                return ast.parse(f"({ast.unparse(assigned[n.id])})", mode="eval").body
            return n

    return ast.unparse(Inline().visit(ast.parse(ast.unparse(node), mode="eval").body))


def _base_name(node: ast.AST) -> str:
    """The first name of a pointer expression, preferring one that ends in _ptr."""
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    ptrs = [n for n in names if n.endswith("_ptr") or n.endswith("_ptrs")]
    return (ptrs or names or [ast.unparse(node)])[0]


def unmasked(kernel: KernelSource, kind: str) -> list:
    """Bases of the kernel's loads or stores (kind) that have no mask, in source order, without repeats."""
    return list(dict.fromkeys(a.base for a in kernel.accesses if a.kind == kind and a.mask is None))


def masks_with_lte(kernel: KernelSource) -> list:
    """Accesses whose mask compares an index with a length by `<=` (`offs <= n` lets element n through;
    `offs <= n - 1` is fine and not listed)."""
    def lte_to_name(mask: str) -> bool:
        try:
            tree = ast.parse(mask, mode="eval")
        except SyntaxError:
            return False
        return any(isinstance(c, ast.Compare) and any(isinstance(op, ast.LtE) and isinstance(r, (ast.Name, ast.Attribute))
                                                      for op, r in zip(c.ops, c.comparators))
                   for c in ast.walk(tree))
    return [a for a in kernel.accesses if a.mask is not None and lte_to_name(a.mask)]


def block_as_stride(kernel: KernelSource) -> list:
    """(pointer base, BLOCK name) for each pointer expression that multiplies a row index by a BLOCK
    constexpr, i.e. uses the block size as a row stride (`buf_ptr + a[:, None] * BLOCK_D`)."""
    if not kernel.block_params:
        return []
    tree = ast.parse(kernel.source)
    found = []
    for node in ast.walk(tree):
        expr = node.args[0] if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                and node.func.attr in ("load", "store") and node.args) else \
            node.value if isinstance(node, ast.Assign) else None
        if expr is None:
            continue
        names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
        if not any(n.endswith("_ptr") or n.endswith("_ptrs") for n in names):
            continue
        for m in ast.walk(expr):
            if not (isinstance(m, ast.BinOp) and isinstance(m.op, ast.Mult)):
                continue
            for side, other in ((m.left, m.right), (m.right, m.left)):
                if isinstance(side, ast.Name) and side.id in kernel.block_params and not _is_program_index(other):
                    found.append((_base_name(expr), side.id))
    return list(dict.fromkeys(found))


def _is_program_index(node: ast.AST) -> bool:
    """tl.program_id(...) or a name like pid / pid_m: block size times a program index is a legitimate offset."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "program_id":
        return True
    return isinstance(node, ast.Name) and ("pid" in node.id or "program" in node.id)
