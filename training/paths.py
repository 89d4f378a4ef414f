"""Where everything lives, relative to the repository root (the only place data paths
are written). ``data/`` holds DVC outputs only; nothing in it is edited by hand."""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
STATE = Path(".kiln")  # the run lock and failure notes (git-ignored)

DATA = Path("data")
SOURCE = DATA / "source.json"  # the ingest source's fingerprint (DVC's probe, see stages.py)
RAW = DATA / "raw"  # ingest: webdataset shards as fetched, report, rejects
# validate: train/ and val/ shards that passed the gate, and nothing else. Every training
# stage depends on all of it, so anything else written here re-ran them all.
CLEAN = DATA / "clean"
# validate's report.json, rejects.parquet and resolved config: they change when a rejected
# sample comes or goes, or a setting that keeps every sample as it was, and no stage reads
# them, so they are kept out of CLEAN's hash (was: inside, one truncated picture added to
# the source retrained every model on byte-identical train/ and val/)
VALIDATION = DATA / "validation"
DOCS = DATA / "data_docs"  # validate's GX Data Docs (time-stamped: kept out of CLEAN's hash)
MODELS = DATA / "models"
VAE, CLIP, UNET = MODELS / "vae", MODELS / "clip", MODELS / "unet"
CONTROLNET = MODELS / "controlnet"  # train_controlnet (when enabled)
LATENTS = DATA / "latents"  # precompute_latents: VAE posteriors + CLIP text states
EVAL = DATA / "eval"  # evaluate: the assembled pipeline, report.html, figures
# beside a pipeline folder (data/eval/pipeline, a registered version's artifacts/pipeline):
# the ControlNet it carries, when evaluate shipped one (inference/control.py, ship)
SHIPPED_CONTROLNET = "controlnet"
METRICS = DATA / "metrics"  # one JSON per stage (DVC metrics, not cached)
CKPT = DATA / "checkpoints"  # training checkpoints (outside DVC: resume state only)
WORK = DATA / ".work"  # resumable scratch (ingest's unfinished shards)
