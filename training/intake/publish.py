"""``kiln publish``: the training splits uploaded to an S3-compatible object store, for
training to stream from (``training.intake.store`` reads them there)."""

from __future__ import annotations

from pathlib import Path

from training.errors import UserError
from training.intake.index import INDEX, file_sha256, parse_index
from training.intake.store import is_remote, s3_client, split_url
from training.intake.store_errors import not_found

# What `kiln publish` uploads: each split's shards and index, and the latents' metadata.
PUBLISHED = ("clean/train", "clean/val", "latents/train", "latents/val")
LATENT_FILES = ("manifest.json", "null_text.safetensors", "preview_text.safetensors")


def publish(data_dir: Path, remote: str) -> dict[str, int]:
    """Upload the training splits under ``data_dir`` to ``remote`` (``s3://bucket/
    prefix``), as ``<prefix>/clean/train/...`` and so on.

    Shards go first, then the latents' metadata, and each split's ``index.json`` last,
    so a reader never sees an index whose files are not all there. A file already in
    the store with the same sha256 is not sent again, so an interrupted publish resumes
    where it stopped. A prefix that already holds a *different* split is refused before
    anything is sent: overwriting shards under a running job's feet would corrupt it.
    Publish each version of the data to its own prefix."""
    from tqdm.auto import tqdm

    if not is_remote(remote):
        raise UserError(f"publish: {remote!r} is not an s3://bucket/prefix")
    remote = remote.rstrip("/")
    client = s3_client()
    bucket, prefix = split_url(remote + "/")
    shards_, meta, indexes = [], [], []  # (local file, key under the prefix)
    for rel in PUBLISHED:
        split = data_dir / rel
        if not (split / INDEX).is_file():
            raise UserError(f"publish: {split / INDEX} is missing (run the pipeline first)")
        text = (split / INDEX).read_text()
        idx = parse_index(text, str(split), str(split / INDEX))
        there = _remote_text(client, bucket, f"{prefix}{rel}/{INDEX}")
        if there is not None and there != text:
            raise UserError(
                f"publish: {remote}/{rel} already holds a different split; publish this "
                "data to a new prefix (e.g. .../v2)"
            )
        shards_ += [(split / s.url, f"{rel}/{s.url}") for s in idx.shards]
        indexes.append((split / INDEX, f"{rel}/{INDEX}"))
    meta = [(data_dir / "latents" / f, f"latents/{f}") for f in LATENT_FILES]
    files = shards_ + meta + indexes
    sent = skipped = 0
    bar = tqdm(
        total=sum(p.stat().st_size for p, _ in files), unit="B", unit_scale=True, desc="publish"
    )
    for path, rel in files:
        sha = file_sha256(path)
        if _remote_sha(client, bucket, prefix + rel) == sha:
            skipped += 1
        else:
            client.upload_file(
                str(path), bucket, prefix + rel, ExtraArgs={"Metadata": {"sha256": sha}}
            )
            sent += 1
        bar.update(path.stat().st_size)
    bar.close()
    return {"uploaded": sent, "already_there": skipped}


def _remote_text(client, bucket: str, key: str) -> str | None:
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except Exception as exc:
        if not_found(exc):
            return None
        raise


def _remote_sha(client, bucket: str, key: str) -> str | None:
    try:
        return client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
    except Exception as exc:
        if not_found(exc):
            return None
        raise
