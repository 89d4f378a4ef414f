"""The benchmarks against today's code: RESULTS.md quotes their commands for a reader to
re-run, but the suite never runs them (they train for minutes to hours), so a renamed
function, a moved module or a new required argument only showed when someone re-ran one.
Here every benchmark is read (not run): each Kiln name it uses, at module level or inside
a function, must exist, and each call of a Kiln function must bind to its signature."""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path

from tests.layout import ROOT

OURS = ("training", "benchmarks", "tests")
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _imports(body: list[ast.stmt]) -> dict[str, object]:
    """The Kiln names ``body``'s import statements bind (nested bodies included)."""
    names: dict[str, object] = {}
    for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    obj = getattr(module, alias.name)
                else:  # a submodule; raises if missing
                    obj = importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = obj
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    importlib.import_module(alias.name)
                    top = alias.asname or alias.name.split(".")[0]
                    names[top] = importlib.import_module(alias.asname and alias.name or top)
    return names


def _local(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names ``fn`` binds itself (arguments, assignments, defs): they shadow an import."""
    a = fn.args
    out = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, DEFS) and node is not fn:
            out.add(node.name)
    return out


def _resolve(expr: ast.expr, names: dict[str, object]) -> object:
    """The object ``expr`` (a name or a dotted chain off one) is, None where it is not a
    Kiln name; AttributeError naming the chain where a module lacks the attribute."""
    if isinstance(expr, ast.Name):
        return names.get(expr.id)
    if not isinstance(expr, ast.Attribute):
        return None
    base = _resolve(expr.value, names)
    if not isinstance(base, types.ModuleType):
        return None  # an object's attributes are not checked (they may be set at run time)
    if hasattr(base, expr.attr):
        return getattr(base, expr.attr)
    try:
        return importlib.import_module(f"{base.__name__}.{expr.attr}")
    except ModuleNotFoundError:
        raise AttributeError(f"{base.__name__}.{expr.attr} does not exist") from None


def _call_errors(call: ast.Call, names: dict[str, object]) -> str | None:
    fn = _resolve(call.func, names)
    if fn is None or not callable(fn):
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n_args = sum(not isinstance(a, ast.Starred) for a in call.args)
    kwargs = {k.arg: None for k in call.keywords if k.arg}
    unpacked = n_args < len(call.args) or len(kwargs) < len(call.keywords)
    try:  # with *args or **kwargs in the call, only what is spelt out can be checked
        (sig.bind_partial if unpacked else sig.bind)(*[None] * n_args, **kwargs)
    except TypeError as e:
        return f"{getattr(fn, '__qualname__', fn)}{sig}: {e}"
    return None


def api_errors(path: Path) -> list[str]:
    """Each use in ``path`` of a Kiln name that no longer exists or no longer takes the
    arguments given, as ``file:line: what``."""
    tree = ast.parse(path.read_text())
    top = [s for s in tree.body if not isinstance(s, ast.FunctionDef | ast.ClassDef)]
    module_names = _imports(top)
    scopes: list[tuple[ast.AST, dict[str, object]]] = [(tree, module_names)]
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            own = _imports(fn.body)
            shadowed = _local(fn) - set(own)
            names = {k: v for k, v in module_names.items() if k not in shadowed} | own
            scopes.append((fn, names))
    errors: set[str] = set()
    for scope, names in scopes:
        for node in ast.walk(scope):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            try:
                if isinstance(node, ast.Attribute):
                    _resolve(node, names)
                elif isinstance(node, ast.Call) and (why := _call_errors(node, names)):
                    errors.add(f"{where}: {why}")
            except AttributeError as e:
                errors.add(f"{where}: {e}")
    return sorted(errors)


def test_benchmarks_use_only_what_exists_as_it_is_called():
    errors = [e for p in sorted((ROOT / "benchmarks").glob("*.py")) for e in api_errors(p)]
    assert not errors, "\n".join(errors)


def test_unet_sweep_keeps_a_skipped_accuracy_as_its_reason():
    """evaluate records an accuracy it could not measure (no held-out prompt among the
    samples) as ``acc_..._skipped`` with a string; the sweep's row rounded every acc_
    value, so the variant failed after its training (TypeError) and its row was lost."""
    from benchmarks.unet_sweep import scores

    why = "no held-out prompt among the 16 samples"
    row = scores({"acc_all": 0.41666, "acc_all_held_out_skipped": why, "clip_score": 0.9, "x": 1})
    assert row == {"acc_all": 0.417, "acc_all_held_out_skipped": why, "clip_score": 0.9}


def test_controlnet_reads_a_base_model_without_a_held_out_figure():
    """A base model whose evaluate drew no held-out prompt has no acc_all_held_out, only
    its reason: controlnet.py stopped there with KeyError before training anything."""
    from benchmarks.controlnet import base_line

    why = "no held-out prompt among the 16 samples"
    ev = {"acc_all": 0.5, "acc_all_seen": 0.5, "acc_all_held_out_skipped": why}
    assert base_line(ev) == f"base model: acc_all 0.500, seen 0.500, held-out — ({why})"
    ev = {"acc_all": 0.5, "acc_all_seen": 0.6, "acc_all_held_out": 0.25}
    assert base_line(ev) == "base model: acc_all 0.500, seen 0.600, held-out 0.250"
