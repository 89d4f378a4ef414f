"""Source kinds: how each ``ingest.dataset`` value becomes something img2dataset fetches.

A kind is one module with three functions:

* ``check(params)``: refuse, before any work folder or download, what no retry can fix
  (raises ``SourceError`` with one line naming the source and what to do);
* ``identity(params) -> list``: JSON-able parts that tell whether a half-finished work
  folder came from this same source (with the params, they make its fingerprint);
* ``prepare(params, work_dir) -> Prepared``: a URL list to download as it is, or a local
  folder and its rows, which ingest serves on loopback so they take the web path.

Adding a kind: one module here plus one entry in ``SOURCE_KINDS`` (and its name in the
``DatasetName`` literal of ``training/config.py``; a test holds the two together).
"""

from __future__ import annotations

from types import ModuleType

from training.intake.kinds import builtin_sets, folder, tars, url_list
from training.intake.kinds.base import Prepared

SOURCE_KINDS: dict[str, ModuleType] = {
    "shapes": builtin_sets,
    "digits": builtin_sets,
    "url-list": url_list,
    "folder": folder,
    "shards": tars,
}

__all__ = ["SOURCE_KINDS", "Prepared"]
