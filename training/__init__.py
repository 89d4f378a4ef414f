"""Kiln training phases: one module per pipeline phase, each exposing ``run(cfg, ...)``."""

__version__ = "0.1.0"
