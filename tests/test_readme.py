"""The README's commands are the ones the Makefile, CI and the CLI really have."""

import re
import subprocess

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_quick_start_is_make_run_then_make_test():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def _make_dry(*args: str) -> str:
    return subprocess.run(
        ["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_make_run_runs_the_whole_pipeline_on_shapes_tiny():
    # --mode scratch: the README's "make run trains from scratch", even after a
    # `kiln run --mode continue` left mode: continue in params.yaml (was: it fine-tuned)
    assert "kiln run --dataset shapes --profile tiny --mode scratch" in _make_dry("run")
    assert "kiln run --dataset digits --profile tiny --mode scratch" in _make_dry(
        "run", "DATASET=digits"
    )


def test_make_install_pins_torch_exactly_and_removes_the_backport():
    # force the recipe to print even when the stamp is fresh
    out = _make_dry("-B", "install")
    assert '"torch==2.13.0"' in out
    assert "uninstall --quiet -y dataclasses" in out


def test_make_test_runs_pytest_and_ci_calls_make_test():
    assert "-m pytest" in _make_dry("test")
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_every_kiln_command_in_the_readme_exists():
    """Against the commands the CLI registers (was: a substring of `kiln --help`, which
    other commands' descriptions also contain: `evaluate` passed with no such command)."""
    import click
    import typer

    from training.cli.user import app

    cli = typer.main.get_command(app)
    commands = set(cli.list_commands(click.Context(cli)))
    assert {"run", "evaluate", "generate", "source"} <= commands
    used = set(re.findall(r"`?kiln ([a-z][a-z-]+)", README))
    assert used, "README shows no kiln commands"
    for command in used:
        assert command in commands, f"README mentions `kiln {command}`, the CLI has none"
