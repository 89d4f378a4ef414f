"""Typed configuration: ``params.yaml`` parsed once, at the edge, into frozen models.

Resolution order for every stage section (later wins):

1. the field defaults below (profile-independent knobs: learning rates, dropout, ...),
2. the profile's sizes (``training/profiles.yaml``: image size, widths, steps, batch),
3. the section in ``params.yaml``.

Size fields have no default here: they come from the profile file, which DVC tracks per
stage, so a size change re-runs only the stages it affects.

Profiles change sizes, never code paths. Unknown keys and wrong types fail at load with
one message naming the file and the key (``ConfigError``); nothing downstream ever sees
a dict.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.sections import (
    SAMPLER,
    ClipCfg,
    ControlNetCfg,
    DatasetName,
    EvaluateCfg,
    IngestCfg,
    LatentsCfg,
    SamplerDefaults,
    UnetCfg,
    VaeCfg,
    ValidateCfg,
)
from training.stages import NAMES

# the schemas live in training/sections.py; this is still the module to import them from
__all__ = [
    "SAMPLER",
    "ClipCfg",
    "ConfigError",
    "ControlNetCfg",
    "DatasetName",
    "EvaluateCfg",
    "IngestCfg",
    "LatentsCfg",
    "Params",
    "SamplerDefaults",
    "UnetCfg",
    "VaeCfg",
    "ValidateCfg",
    "fingerprint",
    "load",
    "resolve",
    "set_values",
]

ProfileName = Literal["tiny", "tiny64", "small", "base"]
# scratch: every model trained from its initialisation; continue: build on the registered
# @champion (its VAE and CLIP reused, its U-Net fine-tuned; training/phases/reuse.py)
Mode = Literal["scratch", "continue"]
BUILTIN_DATASETS = ("shapes", "digits")
STAGES = NAMES  # params.yaml has one section per stage (training/stages.py)
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config dicts, data hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


# What the promotion gate can compare: the metrics of the samples, which evaluate
# measures for the champion too, on the same requests (evaluate.py, champion_scores) ...
GATE_METRICS = ("fd_clip_ratio", "fd_clip", "cmmd_clip", "clip_score", "copies_frac")
# ... not these: each run measures them on its own val split (and its own VAE's
# latents), the champion's number is the one recorded on another week's data
NOT_GATE_METRICS = ("val_loss", "vae_psnr", "vae_ssim")
# ... and a built-in set's oracle accuracies, acc_<attribute>[_<group>]
# (``evaluation/metrics/oracle_accuracy.py``): its attributes and prompt groups
ORACLE_ACCURACIES = {
    "shapes": (("all", "shape", "colour", "size", "position"), ("seen", "held_out")),
    "digits": (("all", "digit"), ("seen",)),  # no held-out compositions
}


AREA_TOLERANCE = 1.25  # a bucket's area is within this factor of side**2


def bucket_sizes(side: int, stride: int, max_ratio: float) -> list[tuple[int, int]]:
    """``(width, height)`` of each aspect-ratio bucket (``intake.buckets``), square
    first, then by aspect ratio. Here, not in the intake, because the models' checks
    below need every side a picture may have."""
    if side % stride:
        raise ValueError(f"image size {side} is not a multiple of the bucket stride {stride}")
    target = side * side
    out = {(side, side)}
    for w in range(stride, int(side * max_ratio) + stride, stride):
        h = max(stride, round(target / w / stride) * stride)
        area_ok = abs(math.log(w * h / target)) <= math.log(AREA_TOLERANCE)
        if area_ok and max(w, h) / min(w, h) <= max_ratio:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda s: (s != (side, side), s[0] / s[1], s))


def patchgan_side(side: int, layers: int) -> int:
    """The side of the logit map ``phases.vae.PatchDiscriminator`` (4x4 kernels, padding
    1; ``layers`` stride-2 convolutions, then two stride-1) gives a ``side`` px picture:
    under 1 its convolutions fail, halfway through training, where it joins."""
    for stride in [2] * layers + [1, 1]:
        side = (side - 2) // stride + 1
    return side


def gate_metrics(oracle: str | None) -> list[str]:
    """Every metric the gate can use on data graded by ``oracle`` (None: no oracle)."""
    attrs, groups = ORACLE_ACCURACIES.get(oracle or "", ((), ()))
    accs = [f"acc_{a}{g}" for a in attrs for g in ("", *(f"_{x}" for x in groups))]
    return [*accs, *GATE_METRICS]


class Params(BaseModel):
    """The whole resolved parameter set; one attribute per DVC stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    profile: ProfileName = "tiny"
    seed: int = Field(0, ge=0)  # numpy generators refuse a negative seed
    mode: Mode = "scratch"
    ingest: IngestCfg
    validate_: ValidateCfg = Field(alias="validate")
    train_vae: VaeCfg
    train_clip: ClipCfg
    precompute_latents: LatentsCfg
    train_unet: UnetCfg
    train_controlnet: ControlNetCfg
    evaluate: EvaluateCfg

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(by_alias=True))

    def buckets(self) -> list[tuple[int, int]] | None:
        """The buckets validate fits clean images to, or None (``ingest.resize_mode`` is
        not ``buckets``)."""
        c = self.ingest
        if c.resize_mode != "buckets":
            return None
        return bucket_sizes(c.image_size, c.bucket_stride, self.validate_.max_aspect_ratio)

    def image_sizes(self) -> list[tuple[int, int]]:
        """Every ``(width, height)`` a clean image may have."""
        return self.buckets() or [(self.ingest.image_size, self.ingest.image_size)]

    @model_validator(mode="after")
    def _sizes_fit_the_models(self) -> Params:
        vae = 2 ** (len(self.train_vae.block_out_channels) - 1)
        down = vae * self.train_unet.downsampling()
        c = self.ingest
        patch = self.train_unet.dit_patch_size
        if self.train_unet.backbone == "dit" and (c.image_size // vae) % patch:
            raise ValueError(
                f"train_unet.dit_patch_size {patch} does not divide "
                f"the latent side {c.image_size // vae} (ingest.image_size {c.image_size} / "
                f"the VAE's downsampling {vae})"
            )
        flow_samplers = ("euler", "dpm++")  # inference/sampling.py's FLOW_SCHEDULERS
        if self.train_unet.backbone == "dit" and self.evaluate.scheduler not in flow_samplers:
            raise ValueError(
                f"evaluate.scheduler {self.evaluate.scheduler} does not sample a rectified "
                f"flow (train_unet.backbone dit): choose {' or '.join(flow_samplers)}"
            )
        if self.train_controlnet.enabled and self.train_unet.backbone != "unet2d":
            raise ValueError(
                "train_controlnet.enabled needs train_unet.backbone unet2d: Kiln trains "
                "ControlNets for the U-Net only (SD3's ControlNet is not built; README)"
            )
        if c.bucket_stride % down or c.image_size % c.bucket_stride:
            raise ValueError(
                f"ingest.bucket_stride {c.bucket_stride} must be a multiple of {down} (the VAE's "
                f"and the denoiser's downsampling) and divide image_size {c.image_size}"
            )
        v = self.train_vae
        if v.crop is not None and (v.crop % vae or v.crop >= c.image_size):
            raise ValueError(
                f"train_vae.crop {v.crop} must be a multiple of the VAE's downsampling {vae} "
                f"and below ingest.image_size {c.image_size} (null trains on whole images)"
            )
        # the shortest side the VAE trains on: a window's (clipped to its picture, as
        # engine.images.random_crops) or a picture's, over every bucket
        side = min(min(v.crop or w, w, h) for w, h in self.image_sizes())
        if v.discriminator and patchgan_side(side, v.disc_layers) < 1:
            least = next(n for n in range(side, 4096) if patchgan_side(n, v.disc_layers) >= 1)
            raise ValueError(
                f"train_vae.discriminator: its {v.disc_layers} layers need pictures of at "
                f"least {least} px a side, and the VAE trains on {side} px (train_vae.crop, "
                "else ingest.image_size or its buckets' shorter sides): fewer disc_layers, "
                "or larger"
            )
        return self

    @model_validator(mode="after")
    def _widths_split_evenly(self) -> Params:
        # the models' own checks come only when a stage builds them, after the stages
        # before it have run (was: train_unet.norm_num_groups 24 failed after ingest,
        # the VAE, CLIP and the latents; train_clip.num_heads 3 as a traceback)
        for name in ("train_vae", "train_unet"):
            c = getattr(self, name)
            if name == "train_unet" and c.backbone != "unet2d":
                continue
            if bad := [w for w in c.block_out_channels if w % c.norm_num_groups]:
                raise ValueError(
                    f"{name}.norm_num_groups {c.norm_num_groups} does not divide "
                    f"{name}.block_out_channels {bad[0]}: group norm splits each level's "
                    "channels into that many groups"
                )
        c = self.train_clip
        for key in ("hidden_size", "vision_hidden_size"):
            if getattr(c, key) % c.num_heads:
                raise ValueError(
                    f"train_clip.num_heads {c.num_heads} does not divide train_clip.{key} "
                    f"{getattr(c, key)}: each head gets that many channels / num_heads"
                )
        return self

    @model_validator(mode="after")
    def _gate_metric_is_measured(self) -> Params:
        # the gate runs after evaluate has sampled and registered: a metric this run
        # cannot produce must stop it here, not leave an alias-less version per try
        m = self.evaluate.gate_metric
        if m in NOT_GATE_METRICS:
            raise ValueError(
                f"evaluate.gate_metric {m} is measured on each run's own val split and "
                "cannot be re-scored for the champion: the gate would compare numbers "
                f"from two data sets (choose {', '.join(gate_metrics(self.oracle()))})"
            )
        if m and m not in gate_metrics(self.oracle()) and not m.startswith("acc_"):
            raise ValueError(
                f"evaluate.gate_metric {m!r} is not a metric evaluate measures (choose "
                f"{', '.join(gate_metrics(self.oracle()))}; or leave it empty)"
            )
        if m and m.startswith("acc_") and not self.oracle():
            raise ValueError(
                f"evaluate.gate_metric {m} is an oracle's accuracy, and {self.ingest.dataset} "
                "data has no oracle (evaluate.oracle names one for an export of a built-in "
                "set); use fd_clip_ratio, or leave gate_metric empty"
            )
        if m and m not in gate_metrics(self.oracle()):  # an accuracy the oracle never reads
            raise ValueError(
                f"evaluate.gate_metric {m!r} is not an accuracy the {self.oracle()} oracle "
                f"measures (choose {', '.join(gate_metrics(self.oracle()))})"
            )
        return self

    def gate_metric(self) -> str:
        """The promotion gate's metric: the oracle's accuracy where there is one."""
        if self.evaluate.gate_metric:
            return self.evaluate.gate_metric
        return "acc_all" if self.oracle() else "fd_clip_ratio"

    def oracle(self) -> str | None:
        """The built-in set whose oracle grades the samples: the dataset's, or the one
        ``evaluate.oracle`` names for an export of it; None for other data."""
        if self.evaluate.oracle:
            return self.evaluate.oracle
        return self.ingest.dataset if self.ingest.dataset in BUILTIN_DATASETS else None


@cache
def profiles() -> dict[str, dict[str, dict[str, Any]]]:
    """The size profiles (``training/profiles.yaml``): ``{profile: {section: values}}``."""
    from training.params_file import load_yaml  # read as params.yaml is (1e-4 a number)

    return load_yaml(PROFILES_FILE.read_text())


# Which field of `Params` each params.yaml section fills.
_SECTION_FIELDS = {"validate": "validate_"}


def resolve(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Turn the raw mapping of a params file into ``Params`` (profile sizes applied)."""
    from training.params_file import format_error  # the served model ships without it

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    known = {"profile", "seed", "mode", *STAGES}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{unknown[0]}' (sections are: {', '.join(sorted(known))})"
        )
    profile = raw.get("profile", "tiny")
    if profile not in profiles():
        raise ConfigError(
            f"{source}: profile: unknown profile {profile!r} (choose {', '.join(profiles())})"
        )
    merged: dict[str, Any] = {
        "profile": profile,
        "seed": raw.get("seed", 0),
        "mode": raw.get("mode", "scratch"),
    }
    for section in STAGES:
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {section}: expected a mapping, got {body!r}")
        values = {**(profiles()[profile].get(section) or {}), **body}
        # YAML has no tuples; tuple-typed fields accept lists from the file (and a tuple
        # of pairs, lists of lists: evaluate.guidance_interval_candidates)
        field_model = Params.model_fields[_SECTION_FIELDS.get(section, section)].annotation
        for name, info in field_model.model_fields.items():  # type: ignore[union-attr]
            is_tuple = "tuple" in str(info.annotation)
            if is_tuple and isinstance(values.get(name), list):
                values[name] = tuple(tuple(v) if isinstance(v, list) else v for v in values[name])
        try:
            field_model.model_validate(values)  # type: ignore[union-attr]
        except ValidationError as err:
            raise ConfigError(format_error(source, section, err)) from None
        merged[section] = values
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_error(source, None, err)) from None


def load(path: str | Path = "params.yaml") -> Params:
    """Load and validate a params file; raises ``ConfigError`` with a one-screen message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the repository root)")
    from training.params_file import load_yaml

    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return resolve(raw, source=str(path))


def run_choices(
    dataset: str | None = None,
    source: str | None = None,
    profile: str | None = None,
    mode: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """params.yaml's updates for a run's ``--dataset/--source/--profile/--mode``: the
    ones given, and a built-in set's ``ingest.source`` cleared (was: an earlier folder
    run's source stayed, and the shapes model's lineage named that folder). A
    ``--source`` for a built-in set (``dataset``, else ``now``: params.yaml's) is
    refused: it reads none (was: trained on its own pictures, the source unread)."""
    kind = dataset or now or "shapes"
    if source and kind in BUILTIN_DATASETS:
        raise ConfigError(
            f"--source {source}: ingest.dataset {kind} is a built-in set and reads no "
            "source; for your own data give --dataset folder, url-list or shards"
        )
    updates = {
        k: v
        for k, v in (
            ("ingest.dataset", dataset),
            ("ingest.source", source),
            ("profile", profile),
            ("mode", mode),
        )
        if v
    }
    if dataset in BUILTIN_DATASETS and not source:
        updates["ingest.source"] = None
    return updates


def set_values(
    path: str | Path, updates: dict[str, Any], check: Callable[[Params], object] | None = None
) -> dict[str, tuple[Any, Any]]:
    """Write dotted-key updates into a params file (comments and order kept; validated
    first, and given to ``check`` when there is one: what it raises leaves the file as
    it was), where DVC sees them; ``{key: (old, new)}`` of the values that changed."""
    from training.params_file import write_values

    def validate(raw: dict) -> None:
        params = resolve(raw, source=str(path))
        if check is not None:
            check(params)

    try:
        return write_values(path, updates, validate)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
