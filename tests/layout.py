"""The package's import graph, read with ``ast`` (no imports run): which files each
stage's command can load. ``tests/test_layout.py`` and ``tests/test_dvc_deps.py`` hold
``dvc.yaml`` and the package structure to it."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "training"

# `kiln` routes a stage command to training.cli.stage alone; the user app
# (training.cli.user) is loaded only for other commands (tests/test_layout.py checks
# that at run time too).
ROUTED = {("training.cli", "training.cli.user")}


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def all_modules() -> list[str]:
    out = []
    for p in sorted((ROOT / PKG).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append(".".join(parts))
    return out


@cache
def imports(name: str) -> frozenset[str]:
    """Modules of the package that ``name`` imports anywhere (function bodies too)."""
    path = module_file(name)
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, mod] if mod else base)
            if not mod.startswith(PKG):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if module_file(sub) else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(f"{PKG}.") or a.name == PKG}
    return frozenset(m for m in found if module_file(m) and m != name)


def with_parents(name: str) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(*starts: str) -> set[str]:
    """Every module loaded, at some point, by importing ``starts``."""
    todo, seen = [m for s in starts for m in with_parents(s)], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for dep in imports(m):
            if (m, dep) not in ROUTED:
                todo.extend(with_parents(dep))
    return seen


# The code the pyfunc model ships (training.tracking.registry.SERVING_CODE): the stage
# that registers the pipeline depends on it, since what it registers runs that code.
SERVED = "training.inference.text2image_model"


def stage_files(phase: str, registers_pipeline: bool = False) -> set[str]:
    """Repository paths of the code a stage's command (``kiln <stage>``) can import:
    the CLI's stage adapter and the stage's phase (imported by name from the table),
    plus the served model's code for the stage that registers it."""
    mods = closure("training.cli", "training.cli.stage", phase)
    if registers_pipeline:
        mods |= closure(SERVED)
    return {module_file(m).relative_to(ROOT).as_posix() for m in mods}


def collapse(files: set[str]) -> list[str]:
    """``files`` with every folder whose Python files are all in it written as the folder
    (how dvc.yaml lists them)."""
    out, covered = [], set()
    dirs = sorted({str(Path(f).parent) for f in files}, key=lambda d: d.count("/"))
    for d in dirs:
        if d == PKG or any(d.startswith(c + "/") for c in covered):
            continue
        inside = {p.relative_to(ROOT).as_posix() for p in (ROOT / d).rglob("*.py")}
        if inside <= files:
            covered.add(d)
            out.append(d)
    out += [f for f in sorted(files) if not any(f.startswith(c + "/") for c in covered)]
    return sorted(out)


def expand(deps: list[str]) -> set[str]:
    """The Python files a dvc.yaml deps list covers (folders expanded)."""
    files = set()
    for d in deps:
        p = ROOT / d
        if p.is_dir():
            files |= {f.relative_to(ROOT).as_posix() for f in p.rglob("*.py")}
        elif d.endswith(".py"):
            files.add(d)
    return files
