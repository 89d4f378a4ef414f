"""What validate keeps of a real collection: Twemoji through `kiln ingest` and
`kiln validate` only (about a minute), for the near-duplicate policy and hash.

Usage (from the repository root):
    .venv/bin/python benchmarks/real_validate.py [--out DIR] [KEY=VALUE ...]

Fetches the collection as benchmarks/real_data.py does (tests/realkit.py: 3,786 Twemoji
at 64 px from npm, CC-BY 4.0, never committed) into a fresh copy of the repository,
applies the params.yaml overrides (dotted keys, YAML values:
`validate.near_duplicates=image+caption`) and prints validate's counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from tests.conftest import copy_project, kiln  # noqa: E402
from tests.realkit import emoji_folder  # noqa: E402
from training import config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/kiln-real-validate"))
    ap.add_argument("overrides", nargs="*", help="params.yaml KEY=VALUE (dotted keys)")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    folder = emoji_folder(args.out / "emoji")
    project = copy_project(args.out / "project")
    updates = {"ingest.dataset": "folder", "ingest.source": str(folder)}
    for item in args.overrides:
        key, _, value = item.partition("=")
        updates[key] = yaml.safe_load(value)
    config.set_values(project / "params.yaml", updates)
    for stage in ("ingest", "validate"):
        proc = kiln(project, stage, timeout=3600, check=False)
        if proc.returncode:
            sys.exit(f"kiln {stage} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((project / "data" / "metrics" / "validate.json").read_text())
    print(f"samples {m['samples']}, rejected {m['rejected']}, train {m['train']}, val {m['val']}")
    print(f"duplicate pairs shown: {project / 'data' / 'data_docs' / 'duplicates.html'}")


if __name__ == "__main__":
    main()
