"""Checkpoints: safetensors + JSON, written atomically (temp dir, fsync, rename, then a
``COMPLETE`` marker); the last two are kept; a corrupt newest one falls back to the
previous with a warning; a checkpoint made with a different config or data
(``fingerprint``) is never resumed. A full disk is a one-line ``DiskFull`` (the
checkpoint, the bytes it needs, the bytes free) that leaves no partial directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.console import say
from training.disk import disk_full, disk_full_code, free_bytes, fsync_dir
from training.engine.distributed import is_main
from training.engine.ema import EMA


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fits(what: str, saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    """``ValueError`` unless ``saved`` has exactly ``live``'s tensor names and shapes."""
    if saved.keys() != live.keys():
        diff = sorted(saved.keys() ^ live.keys())
        raise ValueError(f"its {what} has other tensors than this one ({', '.join(diff[:3])})")
    for name, t in saved.items():
        if t.shape != live[name].shape:
            raise ValueError(
                f"its {what} tensor {name} is {tuple(t.shape)}, here {tuple(live[name].shape)}"
            )


class Checkpointer:
    def __init__(self, directory: str | Path, fingerprint: str, keep: int = 2):
        self.dir = Path(directory)
        self.fp = fingerprint
        self.keep = keep
        self.extra: dict = {}  # the restored checkpoint's ``extra`` (``save``'s)

    def _complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if (p / "COMPLETE").is_file())

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        ema: EMA | None,
        extra: dict | None = None,
    ) -> Path:
        """Write ``step-NNNNNNNN`` atomically and prune to the last ``keep``.

        A full disk raises ``DiskFull`` (one line: the checkpoint, the bytes it needs,
        the bytes free) and leaves no partial directory; the older checkpoints stay
        intact, so a re-run after making room resumes from the newest of them. The free
        space is checked first (the tensors' bytes are known), so usually nothing is
        written at all; a disk that fills during the write is caught and cleaned up too.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        opt_tensors, opt_meta = _optimizer_to_flat(opt)
        files = {"model.safetensors": {k: v.contiguous() for k, v in model.state_dict().items()}}
        files["optimizer.safetensors"] = opt_tensors
        if ema is not None:
            files["ema.safetensors"] = ema.shadow
        state = json.dumps(
            {
                "step": step,
                "fingerprint": self.fp,
                "optimizer": opt_meta,
                "ema_updates": ema.updates if ema else None,
                "extra": extra or {},
            },
            default=str,
        )
        # tensor bytes + a generous safetensors header per tensor + a block per file
        n_tensors = sum(len(f) for f in files.values())
        needed = sum(t.nbytes for f in files.values() for t in f.values())
        needed += 256 * n_tensors + len(state) + 4096 * (len(files) + 2)
        hint = f"free space there or move {self.dir.parent} to a bigger disk"
        if needed > free_bytes(self.dir):
            raise disk_full("checkpoint", final, needed, hint, errno.ENOSPC)
        try:
            tmp.mkdir()
            for name, tensors in files.items():
                save_file(tensors, tmp / name)
            (tmp / "state.json").write_text(state)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (final / "COMPLETE").write_text(self.fp)
            fsync_dir(final)
            fsync_dir(self.dir)
        except BaseException as exc:  # Ctrl-C included: never leave a partial directory
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "COMPLETE").is_file():
                shutil.rmtree(final, ignore_errors=True)
            code = disk_full_code(exc) if isinstance(exc, Exception) else None
            if code is None:
                raise
            raise disk_full("checkpoint", final, needed, hint, code) from exc
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA | None) -> int:
        """Load the newest usable checkpoint; return the step to continue from (0 if none)."""
        for ckpt in reversed(self._complete()):
            try:
                state = json.loads((ckpt / "state.json").read_text())
                if state["fingerprint"] != self.fp:
                    # Made with other config or data: it can never be resumed, and left
                    # in place it would confuse "keep the last two".
                    if is_main():
                        say(f"removing stale checkpoint {ckpt.name} (other config/data)")
                        shutil.rmtree(ckpt, ignore_errors=True)
                    continue
                # every file read before any is applied: a damaged optimizer or EMA file
                # must not leave this checkpoint's weights in a run that then starts
                # from 0 (or from an older checkpoint) with a fresh optimizer
                weights = load_file(ckpt / "model.safetensors")
                flat = load_file(ckpt / "optimizer.safetensors")
                shadow = updates = None
                if ema is not None:
                    dev = str(next(model.parameters()).device)
                    shadow = load_file(ckpt / "ema.safetensors", device=dev)
                    updates = int(state["ema_updates"])
                step = int(state["step"])
                # a readable checkpoint of another model (the stage's code changed while
                # it was interrupted: its fingerprint sees config and data, not code) is
                # refused before anything is applied; load_state_dict copies every tensor
                # that fits before it raises, which left a "fresh" run half-loaded
                _fits("model", weights, model.state_dict())
                if ema is not None:
                    _fits("EMA", shadow, ema.shadow)
                model.load_state_dict(weights)
                _optimizer_from_flat(opt, flat, state["optimizer"])
                if ema is not None:
                    ema.shadow, ema.updates = shadow, updates
                self.extra = dict(state.get("extra") or {})
            except Exception as exc:  # corrupt/truncated files: fall back to the previous
                say(
                    f"WARNING: checkpoint {ckpt} is unreadable or not this model's ({exc}); "
                    "trying an older one"
                )
                continue
            say(f"resuming from {ckpt.name}")
            return step
        if self._complete():  # every one was refused: say where this run starts
            say("WARNING: no checkpoint could be resumed; training from step 0")
        return 0
