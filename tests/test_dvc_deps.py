"""DESIGN rule 6: every stage lists, as DVC deps, each training module its phase can
import (transitively), so a code change re-runs exactly the stages it can affect."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASE = {
    "ingest": "ingest",
    "validate": "validate",
    "train_vae": "vae",
    "train_clip": "clip",
    "precompute_latents": "latents",
    "train_unet": "unet",
    "evaluate": "evaluate",
}
SHARED = {"cli", "config", "env", "mechanics", "runlock", "tracking"}


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "training" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "training":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("training."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("training.")}
    return {m for m in found if (ROOT / "training" / f"{m}.py").exists()}


def _closure(module: str) -> set[str]:
    todo, seen = [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(m) - {"cli"})  # cli imports every phase lazily; not a dep edge
    return seen


def test_every_stage_lists_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(PHASE)
    for stage, phase in PHASE.items():
        deps = {Path(d).stem for d in stages[stage]["deps"] if d.startswith("training/")}
        needed = _closure(phase) | SHARED
        assert needed <= deps, f"{stage}: dvc.yaml deps lack {sorted(needed - deps)}"
