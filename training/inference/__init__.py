"""Inference: pipeline assembly and generation (``sampling``), text conditioning
(``text``) and the MLflow pyfunc served over REST (``text2image_model``). Knows diffusers
and the phases' saved formats, never a training loop."""
