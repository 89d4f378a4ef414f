"""The model phases, one module each: ``vae``, ``clip``, ``latents`` (precompute), ``unet``.
Each has ``run(params, inputs..., out_dir, ...) -> metrics`` and the DVC stage's
``stage(params, tracker)``; the loop, checkpoints and data parallelism are the engine's."""
