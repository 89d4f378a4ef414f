"""Rewrite each dvc.yaml stage's code deps to exactly what its command can import.

Usage: ``.venv/bin/python -m tests.sync_dvc_deps`` after adding or moving a module;
``tests/test_dvc_deps.py`` fails until the deps match. Data deps, params, outs and
comments are left as they are: only the ``training/...`` lines of each ``deps:`` list
are replaced, in sorted order after the data deps.
"""

from __future__ import annotations

import re

from tests.layout import ROOT, collapse, stage_files
from training.stages import PIPELINE_MODEL, STAGES


def main() -> None:
    path = ROOT / "dvc.yaml"
    lines = path.read_text().splitlines()
    out: list[str] = []
    stage = None
    in_deps = False
    for line in lines:
        m = re.match(r"^  (\w+):\s*$", line)
        if m:
            stage = next((s for s in STAGES if s.name == m.group(1)), None)
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            continue
        if in_deps and line.startswith("      - "):
            if line.strip().startswith("- training/"):
                continue
            out.append(line)
            continue
        if in_deps:  # the deps list ended: the code deps go last
            assert stage is not None
            code = collapse(stage_files(stage.phase, stage.model == PIPELINE_MODEL))
            out.extend(f"      - {p}" for p in code)
            in_deps = False
        out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
