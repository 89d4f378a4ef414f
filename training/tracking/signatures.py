"""What a registered model takes and gives: the ``MLmodel`` written beside a component
folder's weights (``registry.register_dir``), so ``mlflow.models.get_model_info``
describes what to feed a ``kiln-vae``, ``kiln-clip``, ``kiln-unet``, ``kiln-controlnet``
or ``kiln-ruler`` version; and the columns the ``kiln-text2image`` pyfunc takes."""

from __future__ import annotations

import json
from pathlib import Path

from training.stages import MODEL_NAMES, PREFIX

RULER_MODEL = f"{PREFIX}kiln-ruler"  # evaluation/ruler.py: the fixed CLIP for FD and CMMD


def component_model(name: str, directory: Path):
    """The ``MLmodel`` of a registered component folder: its tensor signature, read from
    the folder's own config, and how to load it. Batch and sequence dims are -1; images
    are float32 in [-1, 1], NCHW. The folders are diffusers/transformers checkpoints,
    not MLflow flavours, so the MLmodel names the loader instead of a flavour."""
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    cfg = json.loads((Path(directory) / "config.json").read_text())
    f32, i64 = np.dtype("float32"), np.dtype("int64")
    if name == MODEL_NAMES["train_vae"]:
        size = cfg["sample_size"]
        lat = size // 2 ** (len(cfg["block_out_channels"]) - 1)
        inputs = [TensorSpec(f32, (-1, cfg["in_channels"], size, size), "images")]
        outputs = [TensorSpec(f32, (-1, cfg["latent_channels"], lat, lat), "latent_mean")]
        loader = "diffusers.AutoencoderKL.from_pretrained"
    elif name in (MODEL_NAMES["train_clip"], RULER_MODEL):  # the ruler is a CLIP too
        size, text = cfg["vision_config"]["image_size"], cfg["text_config"]["hidden_size"]
        inputs = [
            TensorSpec(i64, (-1, -1), "input_ids"),
            TensorSpec(f32, (-1, 3, size, size), "pixel_values"),
        ]
        outputs = [
            TensorSpec(f32, (-1, -1, text), "text_hidden_states"),
            TensorSpec(f32, (-1, cfg["projection_dim"]), "text_embeds"),
            TensorSpec(f32, (-1, cfg["projection_dim"]), "image_embeds"),
        ]
        loader = "transformers.CLIPModel.from_pretrained (+ CLIPTokenizer)"
    elif name == MODEL_NAMES["train_unet"] and cfg["_class_name"] == "SD3Transformer2DModel":
        size, ch = cfg["sample_size"], cfg["in_channels"]
        inputs = [  # the DiT: timesteps are t x 1000 of a rectified flow, floats
            TensorSpec(f32, (-1, ch, size, size), "hidden_states"),
            TensorSpec(f32, (-1,), "timestep"),
            TensorSpec(f32, (-1, -1, cfg["joint_attention_dim"]), "encoder_hidden_states"),
            TensorSpec(f32, (-1, cfg["pooled_projection_dim"]), "pooled_projections"),
        ]
        outputs = [TensorSpec(f32, (-1, cfg["out_channels"], size, size), "prediction")]
        loader = "diffusers.SD3Transformer2DModel.from_pretrained"
    elif name == MODEL_NAMES["train_unet"]:
        size, ch = cfg["sample_size"], cfg["in_channels"]
        inputs = [
            TensorSpec(f32, (-1, ch, size, size), "sample"),
            TensorSpec(i64, (-1,), "timestep"),
            TensorSpec(f32, (-1, -1, cfg["cross_attention_dim"]), "encoder_hidden_states"),
        ]
        outputs = [TensorSpec(f32, (-1, cfg["out_channels"], size, size), "prediction")]
        loader = "diffusers.UNet2DConditionModel.from_pretrained"
    elif name == MODEL_NAMES["train_controlnet"]:
        ch, text = cfg["in_channels"], cfg["cross_attention_dim"]
        inputs = [  # the control image: RGB in [0, 1] at the sample's pixel size
            TensorSpec(f32, (-1, ch, -1, -1), "sample"),
            TensorSpec(i64, (-1,), "timestep"),
            TensorSpec(f32, (-1, -1, text), "encoder_hidden_states"),
            TensorSpec(f32, (-1, cfg["conditioning_channels"], -1, -1), "controlnet_cond"),
        ]
        outputs = [  # one residual per U-Net down block output, and the middle block's
            TensorSpec(f32, (-1, -1, -1, -1), "down_block_res_samples"),
            TensorSpec(f32, (-1, cfg["block_out_channels"][-1], -1, -1), "mid_block_res_sample"),
        ]
        loader = "diffusers.ControlNetModel.from_pretrained"
    else:
        raise ValueError(f"no component signature for {name!r}")
    return Model(
        signature=ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs)),
        metadata={"load_with": loader, "weights": "safetensors"},
    )


def text2image_signature():
    """The ``kiln-text2image`` pyfunc's columns (``inference/text2image_model.py`` reads
    them). Number columns are "any", checked by the model itself (parse_requests: a
    null is the default, 4.0 is 4, 4.5 and "4" are refused in one line). "long" refuses
    a column with a null row (float64 with NaN) before predict runs; "double" refuses an
    int64 column, a pyfunc caller's DataFrame({"seed": [1, 2]}) or ({"guidance": [4]}),
    in a multi-line message. ``control_is_map`` is not "boolean" either: MLflow casts a
    row's missing value in a boolean column to True in ``dataframe_records`` (was: a
    photo taken for an edge map) and to False in ``dataframe_split``; the model reads
    a missing one as false. A version keeps the signature it was registered with."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    whole = number = anything = AnyType()
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec(whole, "seed", required=False),
                ColSpec(whole, "steps", required=False),
                ColSpec(number, "guidance", required=False),
                ColSpec(number, "guidance_start", required=False),
                ColSpec("string", "negative_prompt", required=False),
                ColSpec(whole, "width", required=False),
                ColSpec(whole, "height", required=False),
                ColSpec("string", "control", required=False),
                ColSpec(number, "control_scale", required=False),
                ColSpec(anything, "control_is_map", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("long", "seed"),
                ColSpec("string", "image"),
                ColSpec("string", "note"),  # what the row should know ("" for nothing)
            ]
        ),
    )
