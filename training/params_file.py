"""Editing a params file in place, comments and order kept (ruamel's round trip).

Kept apart from ``config`` (which validates) so that module stays one idea: what the
parameters are. ``config.set_values`` is the entry point; it passes its validator in.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pydantic import ValidationError


def write_values(
    path: str | Path, updates: dict[str, Any], validate: Callable[[dict], object]
) -> dict[str, tuple[Any, Any]]:
    """Apply dotted-key ``updates`` to the YAML file at ``path``; ``validate(raw)`` must
    accept the result before anything is written. Returns ``{key: (old, new)}`` for the
    keys whose value actually changed."""
    from ruamel.yaml import YAML  # round-trip loader (ships with DVC) keeps comments

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text())
    changed: dict[str, tuple[Any, Any]] = {}
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        old = node.get(leaf)
        if old != value:
            node[leaf] = value
            changed[dotted] = (old, value)
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        validate(yaml.safe_load(buf.getvalue()) or {})
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(buf.getvalue())
        tmp.replace(path)
    return changed


def format_error(source: str, section: str | None, err: ValidationError) -> str:
    """One line per problem, naming the file and the dotted key."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in ((section,) if section else ()) + tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'")
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {loc}: {msg}{shown}" if loc else f"{source}: {msg}")
    return "\n".join(lines)
