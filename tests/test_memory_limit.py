"""Each training stage completes under a memory limit smaller than its decoded data
(issue #14, "Data engine"): the streaming loader never holds a split in RAM.

The limit is a real kernel one, a cgroup (v1 memory controller) the stage's process is
moved into before it starts: exceeding it gets the process killed, not a Python
exception that could be caught. A control run shows the limit binds: the in-memory
loader, given the same limit and data, is killed. Needs root and a writable memory
cgroup (as on CI); skips with the reason otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .loaderkit import STAGE_CALLS, latents_dir, peak_rss_mib, shapes_split, stage_process

CGROUP = Path("/sys/fs/cgroup/memory")
# 40,000 images at 128 px and 16,000 latents with SD's 77 x 768 text states: about 2 GB
# each in the in-memory loader (uint8 pixels; latents and 16-bit text as stored), while
# a streaming stage peaks near 1.3 GiB here (imports alone are 450 MiB).
N_IMG, N_LAT, SIZE, TEXT = 40_000, 16_000, 128, (77, 768)
LIMIT = 1_600 * 10**6
DECODED = {  # bytes the in-memory loader holds for each stage's training split
    "vae": N_IMG * SIZE * SIZE * 3,
    "clip": N_IMG * SIZE * SIZE * 3,
    "unet": N_LAT * (2 * 4 * 8 * 8 * 4 + TEXT[0] * TEXT[1] * 2),
}
PARAMS = {
    "ingest": {"image_size": SIZE},
    "train_vae": {"steps": 4, "batch_size": 8, "val_samples": 32},
    "train_clip": {"steps": 4, "batch_size": 8, "patch_size": 16, "val_samples": 32},
    "train_unet": {"steps": 4, "batch_size": 8, "preview_every": 0},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    if os.geteuid() != 0 or not (CGROUP / "memory.limit_in_bytes").is_file():
        pytest.skip("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    probe = CGROUP / f"kiln-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    root = tmp_path_factory.mktemp("big")
    shapes_split(root / "clean" / "train", N_IMG, SIZE)
    shapes_split(root / "clean" / "val", 64, SIZE, seed=1, prefix="val")
    latents_dir(root / "latents", N_LAT, latent=(4, 8, 8), text=TEXT)
    _python(
        root, "from training.phases import vae\nvae.build(params).save_pretrained(root / 'vae')"
    )
    return root


def _python(root: Path, body: str, loader: str = "stream", cgroup: Path | None = None):
    params = {k: {**v, "loader": loader} if k != "ingest" else v for k, v in PARAMS.items()}

    def enter() -> None:  # in the child, before it runs anything
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return stage_process(root, body, params, preexec=enter if cgroup else None)


@pytest.fixture
def limited():
    cg = CGROUP / f"kiln-test-{os.getpid()}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(LIMIT))
    yield cg
    cg.rmdir()


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_stage_trains_under_a_limit_smaller_than_its_data(root, limited, stage):
    assert DECODED[stage] > LIMIT
    proc = _python(root, STAGE_CALLS[stage], cgroup=limited)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = peak_rss_mib(proc)
    print(
        f"{stage}: decoded {DECODED[stage] / 1e6:.0f} MB, limit {LIMIT / 1e6:.0f} MB, "
        f"peak RSS {peak:.0f} MiB"
    )


def test_the_limit_binds_the_in_memory_loader_is_killed(root, limited):
    proc = _python(root, STAGE_CALLS["vae"], loader="memory", cgroup=limited)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
