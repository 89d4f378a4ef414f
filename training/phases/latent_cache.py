"""Latents already encoded by the same VAE and CLIP are reused, not encoded again.

``data/latents`` persists between runs (DVC ``persist``). Every row carries a content
key: the hash of its clean image's bytes and its caption, stored in each safetensors
file's metadata beside the sample keys. A new run reads the old output's index first;
when the old manifest says its rows came from these exact models (the weights and
configs of the VAE and of CLIP with its tokenizer, ``model_fingerprint``) and the same
row-making code (``code_fingerprint``), and the text states are stored in the same
type, a row whose content key is there is copied, and only the rest go through the VAE
and the text encoder. A continuing run that reuses
its VAE and CLIP (``phases/reuse.py``) so encodes only the samples the data gained.
Rows are copied as they are, never decoded, so an old file is used only when it is the
one its split's ``index.json`` names (size and sha256); one that is not, or does not
open, is left out (``rejected``: said and counted) and its rows are encoded again.

The new output is written beside the old one and swapped in at the end (the old one is
the cache while it runs). A run that is killed leaves its finished files there: the
next run moves them aside (``keep_partial``) and takes their rows as it takes the old
output's, so an interrupted stage resumes instead of encoding everything again.
Memory: the index holds one key per old row; one old file's tensors at a time are
loaded to copy rows from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# files of a model folder that make its outputs what they are (not its pictures or the
# resolved params of the run that wrote it)
_MODEL_SUFFIXES = (".safetensors", ".json", ".txt")
_NOT_MODEL = ("resolved_params.json",)


# The code that turns a clean sample into its row (decoding and scaling the picture,
# tokenizing and encoding the caption, which text states a backbone keeps). A change to
# any of it is a change to every row: DVC re-runs the stage for it, and the cache must
# not then copy the rows the old code made. Wider than needed costs one full encode.
ROW_CODE = (
    "training/phases/latents.py",
    "training/backbones",
    "training/inference/text.py",
    "training/engine/images.py",
    "training/intake/shards.py",
)
_REPO = Path(__file__).resolve().parents[2]


def code_fingerprint(root: Path = _REPO) -> str:
    """Hash of ``ROW_CODE``'s Python files under ``root``."""
    h = hashlib.sha256()
    for entry in ROW_CODE:
        path = root / entry
        for p in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# The one metadata entry of a latents file: its rows' keys and content keys, as JSON.
# One entry, because safetensors writes its metadata map in each process's hash order:
# two entries ("keys", "content") made the same rows a file of other bytes in about
# half the runs, so an unchanged precompute_latents changed its DVC hash and DVC
# retrained the U-Net (or fine-tuned it again, in continue mode) on the same data.
ROWS_META = "kiln.rows"


def rows_meta(keys: list[str], content: list[str]) -> dict[str, str]:
    """The ``metadata=`` of a latents file holding these rows."""
    return {ROWS_META: json.dumps({"content": content, "keys": keys}, sort_keys=True)}


def read_rows_meta(metadata: dict[str, str] | None) -> dict[str, list[str]]:
    """``{"keys": [...], "content": [...]}`` of a latents file's metadata (also the
    older two-entry form)."""
    m = metadata or {}
    if ROWS_META in m:
        return json.loads(m[ROWS_META])
    return {k: [v for v in m.get(k, "").split(",") if v] for k in ("keys", "content")}


def content_key(image_bytes: bytes, caption: str) -> str:
    return hashlib.sha1(image_bytes + b"\0" + caption.encode("utf-8")).hexdigest()[:24]


def model_fingerprint(directory: Path) -> str:
    """Hash of a model folder's weights, configs and tokenizer files."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix in _MODEL_SUFFIXES and p.name not in _NOT_MODEL:
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# in the staging folder and the interrupted runs' rows: which models and code made them
MADE_BY = "made_by.json"


def keep_partial(staging: Path, partial: Path, made_by: dict) -> None:
    """Rank 0, before encoding: the files an interrupted run finished in ``staging``
    (each written to a temp name and renamed: whole or absent) join ``partial`` when
    that run's models, code and text type were ``made_by``; files of other models are
    dropped. ``staging`` then starts empty, recording ``made_by``. Was: the staging
    folder was cleared, and a run killed at 90 % encoded every row again."""

    def made_so(folder: Path) -> bool:
        try:
            return json.loads((folder / MADE_BY).read_text()) == made_by
        except (OSError, ValueError):
            return False

    if not made_so(partial):
        shutil.rmtree(partial, ignore_errors=True)
    if made_so(staging):
        partial.mkdir(parents=True, exist_ok=True)
        (partial / MADE_BY).write_text(json.dumps(made_by))  # first: it vouches for them
        for f in staging.glob("*/*.safetensors"):
            (partial / f.parent.name).mkdir(exist_ok=True)
            os.replace(f, partial / f.parent.name / f.name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / MADE_BY).write_text(json.dumps(made_by))


class LatentCache:
    """The rows of an earlier output, by content key (empty when there is none, or it
    came from other models or another text type: ``reason`` says which)."""

    def __init__(
        self,
        old_dir: Path,
        vae_fp: str,
        clip_fp: str,
        text_dtype: str,
        backbone: str = "unet2d",
        code_fp: str | None = None,
        partial: Path | None = None,
    ):
        """``partial``: an interrupted run's files (``keep_partial``: made by these
        models), taken whole: they have no index, and none was ever cut short."""
        self.where: dict[str, tuple[Path, int]] = {}
        self.hits = 0
        self._file: Path | None = None
        self._rows: dict[str, torch.Tensor] = {}
        self.rejected: dict[Path, str] = {}  # old files left out, and why
        self._index: dict[Path, dict | None] = {}  # each old split's index, by file name
        for f in sorted(partial.glob("*/*.safetensors")) if partial else []:
            try:
                with safe_open(f, "pt") as fh:
                    keys = read_rows_meta(fh.metadata())["content"]
            except Exception as exc:  # noqa: BLE001 (safetensors' error is not exported)
                self.rejected[f] = f"cannot be opened ({exc})"
                continue
            self.where.update((key, (f, i)) for i, key in enumerate(keys))
        resumed = len(self.where)
        self.reason = self._old(old_dir, vae_fp, clip_fp, text_dtype, backbone, code_fp)
        if resumed:
            self.reason += f"; {resumed} rows of the interrupted last run"

    def _old(self, old_dir: Path, vae_fp, clip_fp, text_dtype, backbone, code_fp) -> str:
        """Index the old output's rows when the same models made them; says so, or why not."""
        manifest = old_dir / "manifest.json"
        if not manifest.is_file():
            return "no earlier latents"
        old = json.loads(manifest.read_text())
        if (old["vae"]["fingerprint"], old["clip"]["fingerprint"]) != (vae_fp, clip_fp):
            return "the VAE or CLIP changed"
        if old.get("code") != (code_fp or code_fingerprint()):  # (older outputs: none)
            return "the code that encodes a row changed"
        if old.get("backbone", "unet2d") != backbone:  # another pipeline's text states
            return f"the text states were made for the {old['backbone']} backbone"
        if old["tensors"]["text"]["dtype"] != f"torch.{text_dtype}":
            return "the text states' type changed"
        n = 0
        for f in sorted(old_dir.glob("*/*.safetensors")):
            for i, key in enumerate(self._content(f) or []):
                self.where[key] = (f, i)
                n += 1
        reason = f"{n} rows encoded by the same models"
        if self.rejected:
            reason += (
                f"; {len(self.rejected)} old latent files left out (not the files their "
                "split's index.json names): their rows are encoded again"
            )
        return reason

    def _content(self, f: Path) -> list[str] | None:
        """The content keys of the old file ``f``, once it is checked against its
        split's ``index.json`` (size and sha256, as ``latents.check_clean`` checks the
        clean shards) and opens; else None, and ``rejected`` says why. Its rows are
        copied as they are, never decoded or checked again: an old file with a flipped
        bit was copied into the new latents without a word, and one cut short stopped
        the stage with safetensors' "incomplete metadata", naming no file."""
        from training.intake.index import INDEX, mismatch, parse_index

        split = f.parent
        if split not in self._index:
            path = split / INDEX
            try:
                shards = parse_index(path.read_text(), str(split), str(path)).shards
                self._index[split] = {e.url: e for e in shards}
            except (OSError, ValueError):  # missing or unreadable: nothing there is known
                self._index[split] = None
        entries = self._index[split]
        entry = entries.get(f.name) if entries is not None else None
        if entries is None:
            why = f"no readable {INDEX} in {split.name}/"
        elif entry is None:
            why = f"not named in {split.name}/{INDEX}"
        else:
            why = mismatch(f, entry)
        if why is None:
            try:
                with safe_open(f, "pt") as fh:
                    return read_rows_meta(fh.metadata())["content"]
            except Exception as exc:  # noqa: BLE001 (safetensors' error is not exported)
                why = f"cannot be opened ({exc})"
        self.rejected[f] = why
        return None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """One cached row (tensors of batch size 1), or None."""
        found = self.where.get(key)
        if found is None:
            return None
        path, i = found
        if path != self._file:  # rows are looked up in file order: one file at a time
            self._rows, self._file = load_file(path), path
        self.hits += 1
        return {name: t[i : i + 1] for name, t in self._rows.items()}


def check_made_by(latents: str, manifest: dict, models: dict[str, Path | None]) -> None:
    """``UserError`` unless the latents at ``latents`` were made by the models the stage
    pairs its output with: ``models`` maps "vae" and "clip" to their folders (None: that
    one is not checked), compared with the fingerprints the latents' ``manifest``
    records (one it does not record, as benchmarks' manifests, is not checked). Latents
    in object storage (``KILN_DATA_REMOTE``) are whatever was published there, possibly
    by an older VAE or CLIP than the ones on local disk: a U-Net trained on them was
    saved beside a VAE from another latent space and passed every shape check."""
    from training.errors import UserError

    differ = []
    for name, directory in models.items():
        theirs = (manifest.get(name) or {}).get("fingerprint")
        if directory is not None and theirs and theirs != (ours := model_fingerprint(directory)):
            differ.append(f"{name.upper()} {theirs} there, {ours} in {directory}")
    if not differ:
        return
    todo = "run precompute_latents again (dvc repro precompute_latents)"
    if "://" in latents:  # published: a prefix is never overwritten (intake/store.py)
        todo += (
            ", publish the new latents to a new prefix (kiln publish s3://bucket/new-prefix) "
            "and point KILN_DATA_REMOTE at it"
        )
    raise UserError(f"{latents} were made by other models ({'; '.join(differ)}): {todo}")
