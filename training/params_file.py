"""Editing a params file in place, comments and order kept (ruamel's round trip).

Kept apart from ``config`` (which validates) so that module stays one idea: what the
parameters are. ``config.set_values`` is the entry point; it passes its validator in.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pydantic import ValidationError


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping. PyYAML keeps the
    last silently; DVC's parser (ruamel) refuses the file: a params.yaml with
    `max_prompts` twice under `evaluate` was run by Kiln with the second value, then
    failed inside `dvc repro` after the flow's retries, naming no key."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: PyYAML's own error says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}): keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# A float in exponent form without a dot (`1e-4`, `5E3`): YAML 1.2, DVC's parser
# (ruamel), reads a number; PyYAML's YAML 1.1 reads the string '1e-4', so `lr: 1e-4`
# was refused as "Input should be a valid number (got '1e-4')" while DVC tracked 0.0001
_UniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """``yaml.safe_load``, refusing duplicate keys and reading exponent floats as DVC
    does (``_UniqueKeys``)."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader subclass)


def read_value(path: str | Path, dotted: str) -> Any:
    """The value at the dotted key of the params file at ``path``; None where it is
    absent or unreadable (the file's own check, when it is loaded, says what is wrong)."""
    try:
        node: Any = load_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


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
    text = path.read_text()
    load_yaml(text)  # duplicate keys: one line here (ruamel's own error is a traceback)
    doc = rt.load(text)
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
        validate(load_yaml(buf.getvalue()) or {})
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
