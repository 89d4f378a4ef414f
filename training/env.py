"""Process-wide defaults: offline, no telemetry, quiet library progress bars, and how
many CPU threads torch may use.

Kiln never downloads weights or data at run time, and several libraries in the stack
phone home by default (Hugging Face hub, Great Expectations analytics, albumentations'
update check inside img2dataset, MLflow and Prefect telemetry). Every entry point calls
``offline_defaults()`` first; an explicit user setting always wins (``setdefault``).

``thread_plan()`` sizes torch's intra-op threads. This module stays free of torch (it is
imported by every command, ingest included); ``engine.distributed.set_torch_threads`` applies it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' own progress bars
    # Read when diffusers/transformers are first imported: setting verbosity this way
    # instead of importing them here keeps `kiln ingest`/`validate` (which never touch
    # them) ~3 s faster to start.
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A fresh Prefect home migrates its SQLite database when the ephemeral API first
    # starts; on a busy 2-core machine that takes longer than Prefect's 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "TOKENIZERS_PARALLELISM": "false",
    # No OMP_WAIT_POLICY here: PASSIVE (threads sleep at barriers) helped two trainings
    # sharing 2 busy cores but cost a lone training 36% on a quiet machine, the common
    # case (benchmarks/RESULTS.md, "Torch threads"). Two trainings on one machine:
    # give each KILN_THREADS=<cores / 2> (2.7x the pair's total throughput here).
    "PYTHONWARNINGS": "ignore",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


# torchrun sets OMP_NUM_THREADS=1 in its workers when it starts more than one and finds
# none set, so inside a worker a "1" may be torchrun's, not the user's. The first Kiln
# process of a run (``kiln run`` or the stage command that relaunches itself under
# torchrun) notes here what the user had set, "" for nothing; its children inherit it.
USER_OMP = "KILN_USER_OMP_NUM_THREADS"


def offline_defaults() -> None:
    os.environ.setdefault(USER_OMP, os.environ.get("OMP_NUM_THREADS", ""))
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    import warnings

    warnings.filterwarnings("ignore")


# ---- torch threads ---------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadPlan:
    """``threads``: what to pass to ``torch.set_num_threads`` (None: leave torch as the
    user's OMP_NUM_THREADS set it); ``cpus``: CPUs this process may use; ``procs``: Kiln
    processes sharing them; ``source``: an explicit setting that decided, if any."""

    threads: int | None
    cpus: int
    procs: int
    source: str = ""


def read_cpu_max(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> str | None:
    """The CPU quota of this process's cgroup as cgroup v2 writes it ("max 100000" or
    "200000 100000": quota and period in µs), or None without a CPU controller.

    v2: the tightest ``cpu.max`` from this cgroup up to the root (a pod's limit may sit
    on a parent). v1: ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1: no limit) of
    this cgroup under the ``cpu`` hierarchy.
    A container usually sees its own cgroup as the root, so both fall back to that."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    v2_path = next((ln[3:] for ln in proc_cgroup.splitlines() if ln.startswith("0::")), "/")
    best: tuple[float, str] | None = None
    d = root / v2_path.strip().lstrip("/")
    for cg in [d, *d.parents]:
        try:
            text = (cg / "cpu.max").read_text().strip()
        except OSError:
            text = ""
        if text:
            quota, _, period = text.partition(" ")
            cpus = float("inf") if quota == "max" else int(quota) / int(period or 100000)
            if best is None or cpus < best[0]:
                best = (cpus, text)
        if cg == root:
            break
    if best is not None:
        return best[1]
    # v1: "N:cpu,cpuacct:/path"; the controller may be mounted as cpu or cpu,cpuacct
    v1_path = next(
        (
            ln.split(":", 2)[2]
            for ln in proc_cgroup.splitlines()
            if ln.count(":") >= 2 and "cpu" in ln.split(":")[1].split(",")
        ),
        "/",
    )
    for cpu_dir in (root / "cpu" / v1_path.strip().lstrip("/"), root / "cpu"):
        try:
            quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
            period = int((cpu_dir / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return f"{'max' if quota < 0 else quota} {period}"
    return None


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        return set(range(os.cpu_count() or 1))


def thread_plan(
    environ: Mapping[str, str] | None = None,
    affinity: set[int] | None = None,
    cpu_max: str | None = None,
) -> ThreadPlan:
    """How many intra-op threads torch should use in this process.

    torch defaults to every core it can see. Two processes that each do that on
    the same cores make every parallel region wait for a thread that is not running
    (OpenMP threads busy-wait at each barrier): under a CPU quota, or with N ranks on one
    machine, that is many times slower, not 1/N. So: the CPUs this process may run on
    (its affinity mask, capped by the cgroup CPU quota, rounded down: 1.5 CPUs of quota
    cannot keep two threads busy), divided among the processes torchrun started on this
    machine (``LOCAL_WORLD_SIZE``), at least 1. ``KILN_THREADS`` or the user's own
    ``OMP_NUM_THREADS`` always win. The plan does not look at load: unrelated processes
    come and go, and a count that changed with them would change results between a run
    and its resumption. ``affinity``/``cpu_max`` default to the real readers (tests pass
    fakes; ``cpu_max=""`` means no CPU controller)."""
    env = os.environ if environ is None else environ
    if affinity is None:
        affinity = _affinity()
    if cpu_max is None:
        cpu_max = read_cpu_max()
    cpus = max(1, len(affinity))
    quota, _, period = (cpu_max or "max").partition(" ")
    if quota != "max":
        cpus = max(1, min(cpus, int(quota) // int(period or 100000)))
    procs = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    if env.get("KILN_THREADS"):
        return ThreadPlan(_count(env, "KILN_THREADS"), cpus, procs, "KILN_THREADS")
    omp = env.get("OMP_NUM_THREADS", "")
    if omp and env.get(USER_OMP, omp) == omp:  # the user's, not torchrun's default
        return ThreadPlan(None, cpus, procs, f"OMP_NUM_THREADS={omp}")
    return ThreadPlan(max(1, cpus // procs), cpus, procs)


LOADER_THREADS = "KILN_LOADER_THREADS"


def _count(env: Mapping[str, str], name: str) -> int:
    """A thread count the user set: a whole number >= 1, else ValueError naming it (0
    used to mean 1 for the loader, silently)."""
    raw = env[name].strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {env[name]!r}")
    return int(raw)


def loader_threads(environ: Mapping[str, str] | None = None) -> int:
    """Decode threads per process (``KILN_LOADER_THREADS``, default up to 4; results never
    depend on it)."""
    env = os.environ if environ is None else environ
    if env.get(LOADER_THREADS, "").strip():
        return _count(env, LOADER_THREADS)
    return min(4, os.cpu_count() or 1)


def setting_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """Kiln's own environment settings that a stage would refuse, found before any work
    (a bad ``KILN_THREADS`` used to stop ``kiln run`` at its first training stage, after
    ingest and validate)."""
    env = os.environ if environ is None else environ
    found = []
    for name in ("KILN_THREADS", LOADER_THREADS):
        if env.get(name, "").strip():
            try:
                _count(env, name)
            except ValueError as exc:
                found.append(str(exc))
    return found
