"""``kiln``: the command line.

A stage command (``kiln ingest`` ... ``kiln evaluate``, what ``dvc.yaml`` runs) loads only
``training/cli/stage.py`` and what that stage imports; anything else loads the full app
(``training/cli/user.py``). So ``kiln ingest`` never imports torch, and DVC re-runs no
stage when a user command changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training.stages import STAGES

STAGE_COMMANDS = frozenset(s.command for s in STAGES)
# commands that need params.yaml in the folder they start in, and write .kiln/ and data/
# there: the stage commands (but `ingest` with options, which runs standalone with --out
# and says so without), run and ruler. generate and export take a --model path and an
# --out, the playground a registry (MLFLOW_TRACKING_URI), doctor the environment only.
PROJECT_COMMANDS = STAGE_COMMANDS | {"run", "ruler"}


def _is_root(folder: Path) -> bool:
    return (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file()


def check_root(args: list[str]) -> None:
    """Refuse a command started anywhere but the project root, before it creates
    anything. Kiln's paths are relative to the folder it starts in (``training/paths.py``),
    and a user's own (``--out``, ``--model``, ``--source``) to it too, so a subfolder is
    refused rather than the root looked for: run from ``data/``, ``kiln run`` made
    ``data/.kiln`` and said "cannot start the run: [Errno 2] No such file or directory:
    'params.yaml'". Outside any project only the commands that need one are refused
    (``generate --model PATH``, ``ingest --out DIR`` and a playground on a registry run
    anywhere); help and ``doctor`` always run."""
    if not args or args[0].startswith("-") or args[0] == "doctor" or "--help" in args:
        return
    here = Path.cwd()
    if (here / "params.yaml").is_file():
        return
    from training.cli.base import UserError

    root = next((p for p in here.parents if _is_root(p)), None)
    if root is not None:
        raise UserError(
            f"{here} is inside the Kiln project {root}: run kiln from the repository "
            f"root (cd {root}); nothing was done"
        )
    if args[0] in PROJECT_COMMANDS and not (args[0] == "ingest" and len(args) > 1):
        raise UserError(
            f"no params.yaml in {here}: run kiln {args[0]} from the repository root "
            "(the folder with params.yaml and dvc.yaml); nothing was done"
        )


def main() -> None:  # pragma: no cover - console entry
    from training.cli.base import UserError

    try:
        check_root(sys.argv[1:])
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(1)
    if len(sys.argv) > 1 and sys.argv[1] in STAGE_COMMANDS:
        from training.cli.stage import app
    else:
        from training.cli.user import app
    try:
        app()
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(1)
