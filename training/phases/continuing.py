"""The check a continuing run (``mode: continue``) makes before any stage runs.

A continuing run builds on the registered champion: its VAE and CLIP are installed by
``train_vae``/``train_clip`` and its U-Net is fine-tuned by ``train_unet``
(``phases/reuse.py``). Each stage checks its own model when it starts, but the U-Net's
stage comes after ingestion, validation and the VAE and CLIP stages: a champion whose
U-Net no longer fits the profile (another width, latent or text size) would fail there,
minutes in. ``preflight`` fails first, in seconds: the registry answers, and the
champion's three components exist and fit this profile, the U-Net tensor for tensor
(built on the ``meta`` device, so nothing is allocated).

And that the champion was trained on this collection (``same_collection``): a continuing
run on another dataset would reuse a VAE and a CLIP (its tokenizer) made for other
pictures and captions, fine-tune a U-Net that knows other prompts, and the gate would
re-score that champion on prompts it never saw, so the new model would take
``@champion`` from a model of another collection. A collection that grew is the same one.

Only the flow and ``kiln run`` import this module, so its imports are no stage's DVC
deps.
"""

from __future__ import annotations

import json

from training.config import Params
from training.console import say
from training.phases.reuse import (
    UNET_WEIGHTS,
    ReuseError,
    builds_on,
    check,
    fits,
    resolve,
    same_config,
    same_objective,
    same_spaces,
)
from training.tracking.lineage import collection, other_collection

STAGES = ("train_vae", "train_clip", "train_unet")


def preflight(params: Params) -> dict[str, str] | None:
    """``{stage: "name/version"}`` of what a continuing run will build on, or None when
    it trains from scratch (``mode: scratch``, or no champion yet). Raises
    ``ReuseError`` for a champion that does not fit or was trained on another
    collection (``same_collection``), ``ConnectionError`` for a
    registry that cannot be reached."""
    if params.mode != "continue":
        return None
    from training.stages import PIPELINE_MODEL
    from training.tracking import components

    champion = components.champion(PIPELINE_MODEL)
    if champion is None:
        return None  # each stage will say so too, and train from scratch
    same_collection(params, champion)
    _components_follow(PIPELINE_MODEL, champion)
    refs = {s: builds_on(s, params) for s in STAGES}
    if not all(refs.values()):  # a champion crowned before its components were
        missing = ", ".join(f"{s}" for s, r in refs.items() if not r)
        raise ReuseError(f"mode continue: nothing to build on for {missing}")
    dirs, versions = {}, {}
    for stage, ref in refs.items():
        dirs[stage], version = resolve(ref)  # type: ignore[arg-type]
        versions[stage] = version or str(dirs[stage])
        if stage != "train_unet":
            check(stage, ref, dirs[stage], params)  # type: ignore[arg-type]
    _unet_fits(refs["train_unet"], dirs, params)  # type: ignore[arg-type]
    return versions


def _components_follow(name: str, champion: str) -> None:
    """Crown again the components a promotion that stopped halfway left on the old
    champion (``gate.components_behind``), so that ``models:/kiln-unet@champion`` is
    the champion's U-Net when the stages resolve it (was: the previous one, fine-tuned
    without a word)."""
    from training.tracking.gate import components_behind, crown_components

    behind = components_behind(name, champion)
    if behind:
        shown = ", ".join(f"{m}@champion is v{now}, not v{v}" for m, (now, v) in behind.items())
        say(
            f"mode continue: the champion {name} v{champion} was built from other "
            f"components ({shown}): a promotion stopped halfway; crowning its own"
        )
        crown_components(name, champion)


def same_collection(params: Params, version: str) -> None:
    """Raise ``ReuseError`` unless ``PIPELINE_MODEL`` version ``version`` (the champion)
    was trained on this run's collection: the same dataset kind and, for user data
    (folder, url-list, shards), the same source.

    Not the data's hash or row counts: continuous training exists so that rows arrive
    week after week, and a folder, list or shard set that grew must still continue.
    A shard range (``part-{0000..0099}.tar``) may grow its bounds; a local path is
    compared resolved (``data/pets`` and ``./data/pets/`` are one folder).

    A champion that records no collection (registered before its tags and config were
    logged: ``tracking/lineage.py``, ``recorded_data``) is built on with a warning, as
    before: refusing it would stop every scheduled run of an existing registry.
    To build on a champion of another collection on purpose, name its models with
    ``mode: scratch`` (``train_vae.reuse``, ``train_clip.reuse``, ``train_unet.init_from``)."""
    from training.stages import PIPELINE_MODEL

    ours = (params.ingest.dataset, params.ingest.source)
    theirs = other_collection(params, version)
    if theirs == "":
        say(
            f"mode continue: {PIPELINE_MODEL} v{version} (@champion) records no dataset; "
            f"building on it for {collection(*ours)} unchecked"
        )
    elif theirs is not None:
        raise ReuseError(
            f"the champion ({PIPELINE_MODEL} v{version}) was trained on "
            f"{theirs}, this run is on {collection(*ours)}: run --mode "
            "scratch (mode: scratch) for a new collection"
        )


def _unet_fits(ref: str, dirs: dict, params: Params) -> None:
    """The champion U-Net against the profile's, built for the champion VAE's latents
    and CLIP's text states (the ones this run will install)."""
    import torch
    from safetensors import safe_open

    from training.backbones import TextDims
    from training.phases.unet import build, objective

    vae = json.loads((dirs["train_vae"] / "config.json").read_text())
    clip = json.loads((dirs["train_clip"] / "config.json").read_text())
    weights = dirs["train_unet"] / UNET_WEIGHTS
    if not weights.is_file():
        raise ReuseError(f"{ref}: no {UNET_WEIGHTS}: not a U-Net folder")
    size = params.ingest.image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    text = TextDims(hidden=clip["text_config"]["hidden_size"], pooled=clip["projection_dim"])
    with torch.device("meta"):
        model = build(params, vae["latent_channels"], size, text)
    cls = json.loads((dirs["train_unet"] / "config.json").read_text()).get("_class_name")
    if cls != type(model).__name__:
        raise ReuseError(
            f"{ref}: a {cls}, but the {params.train_unet.backbone} backbone is a "
            f"{type(model).__name__}: set mode: scratch to change backbones"
        )
    same_objective(ref, dirs["train_unet"], objective(params))
    from training.phases.latent_cache import model_fingerprint

    spaces = {"vae": dirs["train_vae"], "clip": dirs["train_clip"]}
    same_spaces(ref, dirs["train_unet"], {k: model_fingerprint(d) for k, d in spaces.items()})
    with safe_open(weights, "pt") as f:
        theirs = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    fits(ref, params, {k: list(v.shape) for k, v in model.state_dict().items()}, theirs)
    same_config(ref, dirs["train_unet"], model)
