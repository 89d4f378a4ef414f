"""``kiln``: the command line.

A stage command (``kiln ingest`` ... ``kiln evaluate``, what ``dvc.yaml`` runs) loads only
``training/cli/stage.py`` and what that stage imports; anything else loads the full app
(``training/cli/user.py``). So ``kiln ingest`` never imports torch, and DVC re-runs no
stage when a user command changes.
"""

from __future__ import annotations

import sys

from training.stages import STAGES

STAGE_COMMANDS = frozenset(s.command for s in STAGES)


def main() -> None:  # pragma: no cover - console entry
    from training.cli.base import UserError

    if len(sys.argv) > 1 and sys.argv[1] in STAGE_COMMANDS:
        from training.cli.stage import app
    else:
        from training.cli.user import app
    try:
        app()
    except UserError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        sys.exit(1)
