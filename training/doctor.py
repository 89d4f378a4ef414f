"""Environment check run after install: catches the dependency traps of this stack.

Two were found when the stack was first co-installed:

* img2dataset depends on the obsolete ``dataclasses`` backport (for Python 3.6), which
  pip happily installs on 3.11 and which then shadows the standard library inside
  Prefect's ephemeral API server (``dataclass() got an unexpected keyword argument
  'slots'``).
* prefect 3.8 cannot build its API on fastapi >= 0.151 (``Body() got an unexpected
  keyword argument 'min_items'``).

``python -m training.doctor`` exits non-zero with one line per problem.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from training import env


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def problems() -> list[str]:
    """Return a human-readable list of environment problems (empty when healthy)."""
    found: list[str] = list(env.setting_problems())
    try:
        md.distribution("dataclasses")
    except md.PackageNotFoundError:
        pass
    else:
        found.append(
            "the obsolete 'dataclasses' backport is installed (pulled in by img2dataset); "
            "it shadows the standard library inside Prefect's server: pip uninstall -y dataclasses"
        )
    try:
        prefect_v = _version_tuple(md.version("prefect"))
        fastapi_v = _version_tuple(md.version("fastapi"))
    except md.PackageNotFoundError as exc:
        found.append(f"missing package: {exc}")
    else:
        if prefect_v < (3, 9, 1) and fastapi_v >= (0, 151):
            found.append(
                f"prefect {md.version('prefect')} cannot start its API with fastapi "
                f"{md.version('fastapi')}: install 'fastapi<0.151'"
            )
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(f"kiln doctor: {line}", file=sys.stderr)
    if not found:
        print("kiln doctor: environment OK")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
