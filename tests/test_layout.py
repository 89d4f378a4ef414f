"""The package's structure: no import cycles, modules of one idea and modest size, and
stage commands that load only what their stage needs (the data stages never torch)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.layout import ROOT, all_modules, imports, module_file

MAX_LINES = 400


def test_no_import_cycles():
    """Explicit imports only (a package's __init__ running first is not an edge)."""
    graph = {m: imports(m) for m in all_modules()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_modules_stay_small():
    big = {
        module_file(m).relative_to(ROOT).as_posix(): n
        for m in all_modules()
        if (n := len(module_file(m).read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


BLOCKER = """
import importlib.abc, sys

BLOCKED = ("torch", "training.cli.user", "flows")

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
        return None

sys.meta_path.insert(0, _Block())
"""


def test_data_stage_commands_never_import_torch_or_the_user_commands(tmp_path):
    """``kiln ingest`` and ``kiln validate`` run to the end with torch missing (as if not
    installed; webdataset then uses its stand-ins) and the user commands' module and the
    flows unimportable, in every process they start: Kiln's data path needs none of them."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(
        "profile: tiny\ningest: {dataset: shapes, num_samples: 120, samples_per_shard: 60}\n"
        "validate: {val_fraction: 0.1}\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    kiln = str(Path(sys.executable).with_name("kiln"))
    for command in ("ingest", "validate"):
        done = subprocess.run(
            [kiln, command], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "blocked by the test" not in done.stderr
    assert any((project / "data" / "clean" / "train").glob("*.tar"))
    # the hook works: a torch stage fails on it
    done = subprocess.run(
        [kiln, "train-vae"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0 and "blocked by the test: torch" in done.stderr


def test_run_help_names_every_dataset_kind_and_the_source_option():
    from typing import get_args

    from training.config import DatasetName

    kiln = str(Path(sys.executable).with_name("kiln"))
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}  # this checkout's code
    out = subprocess.run(
        [kiln, "run", "--help"], capture_output=True, text=True, timeout=120, env=env
    ).stdout
    for kind in get_args(DatasetName):
        assert kind in out, f"kiln run --help does not name {kind!r}"
    assert "--source" in out


def test_every_dataset_kind_has_a_source_kind_module():
    from typing import get_args

    from training.config import DatasetName
    from training.intake.kinds import SOURCE_KINDS

    assert set(SOURCE_KINDS) == set(get_args(DatasetName))
    for name, kind in SOURCE_KINDS.items():
        for fn in ("check", "identity", "prepare"):
            assert callable(getattr(kind, fn, None)), f"{name}: {kind.__name__} lacks {fn}()"


def test_the_served_model_imports_from_its_shipped_code_alone(tmp_path):
    """The pyfunc ships only ``SERVING_CODE``; what it imports must all be in there (the
    editable install would otherwise hide a missing module from every local test)."""
    from training.tracking.registry import serving_code

    serving_code(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(tmp_path)!r})
        # the modules it imports, at load and per request, some inside functions
        import training.inference.text2image_model as served
        import training.inference.sampling as sampling
        import training.inference.text as text
        import training.engine.distributed as distributed
        for m in (served, sampling, text, distributed):
            assert m.__file__.startswith({str(tmp_path)!r}), m.__file__
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_benchmarks_import_only_what_exists():
    """The benchmarks are not run by the suite; their Kiln imports still must resolve."""
    import ast
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("training"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    if not hasattr(module, alias.name):
                        importlib.import_module(name)  # a submodule; raises if missing
