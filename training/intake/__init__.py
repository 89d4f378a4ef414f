"""Data intake and the quality gate: sources, the fetch guard, ingest (img2dataset ->
webdataset shards), validate (Great Expectations), shard I/O. Imports no torch, MLflow or
Prefect, so the data stages start fast and re-run only for data code."""
