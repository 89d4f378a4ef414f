"""Torch's intra-op threads are sized from the CPUs this process may really use (affinity,
cgroup quota) and shared among the processes of one machine (issue #12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import engine as E
from training import env
from training.engine import distributed

EIGHT = set(range(8))


def plan(environ=None, affinity=EIGHT, cpu_max="max 100000"):
    return env.thread_plan(environ or {}, affinity=affinity, cpu_max=cpu_max)


def test_all_cpus_of_the_affinity_mask_without_a_quota():
    p = plan()
    assert (p.threads, p.cpus, p.procs) == (8, 8, 1)
    assert plan(affinity={0, 3}).threads == 2  # taskset / docker --cpuset-cpus
    assert plan(cpu_max="").threads == 8  # no cgroup CPU controller at all


def test_cgroup_quota_caps_the_threads():
    assert plan(cpu_max="200000 100000").threads == 2  # docker --cpus=2 on an 8-core host
    assert plan(cpu_max="150000 100000").threads == 1  # 1.5 CPUs: never more than the quota
    assert plan(cpu_max="50000 100000").threads == 1  # at least one
    assert plan(affinity={0}, cpu_max="400000 100000").threads == 1  # the smaller wins


def test_processes_on_one_machine_share_the_cpus():
    assert plan({"LOCAL_WORLD_SIZE": "2"}).threads == 4
    p = plan({"LOCAL_WORLD_SIZE": "4"}, affinity={0, 1})
    assert (p.threads, p.cpus, p.procs) == (1, 2, 4)


def test_torchruns_own_omp_default_does_not_count_as_the_users():
    # torchrun sets OMP_NUM_THREADS=1 when it starts >1 process and finds none set;
    # offline_defaults() noted beforehand that the user had set none.
    launched = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", env.USER_OMP: ""}
    assert plan(launched).threads == 4
    # the user's own setting, seen before torchrun, wins
    assert plan({**launched, env.USER_OMP: "1"}).threads is None


def test_explicit_settings_win():
    p = plan({"OMP_NUM_THREADS": "3"})
    assert p.threads is None and "OMP_NUM_THREADS" in p.source  # torch read it itself
    assert plan({"KILN_THREADS": "5"}).threads == 5
    assert plan({"KILN_THREADS": "5", "OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}).threads == 5
    with pytest.raises(ValueError, match="KILN_THREADS"):
        plan({"KILN_THREADS": "lots"})
    with pytest.raises(ValueError, match="KILN_THREADS"):
        plan({"KILN_THREADS": "0"})


def test_offline_defaults_record_whether_the_user_set_omp(monkeypatch):
    monkeypatch.delenv(env.USER_OMP, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    env.offline_defaults()
    assert env.os.environ[env.USER_OMP] == "2"
    monkeypatch.delenv(env.USER_OMP)
    monkeypatch.delenv("OMP_NUM_THREADS")
    env.offline_defaults()
    assert env.os.environ[env.USER_OMP] == ""


def test_openmp_wait_policy_is_left_to_torch_and_the_user(monkeypatch):
    """PASSIVE cost a lone training 36% on a quiet machine (RESULTS.md): not a default."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env.offline_defaults()
    assert "OMP_WAIT_POLICY" not in env.os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env.offline_defaults()
    assert env.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def _write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def test_cgroup_v2_reader_takes_the_tightest_limit_up_the_tree(tmp_path):
    fs = tmp_path / "cgroup"
    _write(fs, "cpu.max", "max 100000\n")
    _write(fs, "kubepods/cpu.max", "300000 100000\n")
    _write(fs, "kubepods/pod1/cpu.max", "max 100000\n")
    read = env.read_cpu_max(fs, "0::/kubepods/pod1\n")
    assert read == "300000 100000"
    assert env.read_cpu_max(fs, "0::/\n") == "max 100000"


def test_cgroup_v1_reader(tmp_path):
    fs = tmp_path / "cgroup"
    _write(fs, "cpu/cpu.cfs_quota_us", "-1\n")
    _write(fs, "cpu/cpu.cfs_period_us", "100000\n")
    assert env.read_cpu_max(fs, "1:cpu:/\n") == "max 100000"
    _write(fs, "cpu/cpu.cfs_quota_us", "250000\n")
    assert env.read_cpu_max(fs, "1:cpu:/\n") == "250000 100000"
    _write(fs, "cpu/docker/c1/cpu.cfs_quota_us", "100000\n")
    _write(fs, "cpu/docker/c1/cpu.cfs_period_us", "100000\n")
    assert env.read_cpu_max(fs, "4:cpu,cpuacct:/docker/c1\n0::/\n") == "100000 100000"
    assert env.read_cpu_max(tmp_path / "nothing", "") is None


def test_real_readers_give_a_sane_plan():
    p = env.thread_plan({})
    assert 1 <= p.cpus <= (env.os.cpu_count() or 1) and p.procs == 1


def test_stage_processes_apply_the_plan_once_and_say_it(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(distributed, "_threads_set", False)
    monkeypatch.setenv("KILN_THREADS", "1")
    try:
        E.init_distributed()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("KILN_THREADS", "2")
        E.init_distributed()  # once per process
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert err.count("[kiln] torch threads: 1 (") == 1, err


def test_loader_threads_are_a_count_the_user_set_or_up_to_four():
    assert env.loader_threads({"KILN_LOADER_THREADS": "3"}) == 3
    assert 1 <= env.loader_threads({}) <= 4
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="KILN_LOADER_THREADS"):
            env.loader_threads({"KILN_LOADER_THREADS": bad})
    assert env.setting_problems({"KILN_LOADER_THREADS": "0", "KILN_THREADS": "4"}) == [
        "KILN_LOADER_THREADS must be a whole number >= 1, got '0'"
    ]


def test_a_batch_that_processes_cannot_split_stops_the_run_before_any_stage(monkeypatch):
    """``KILN_NPROC=3`` with tiny's batch sizes (32, 128, 64) failed at the first step
    of train_vae, after ingest and validate had run; the flow's preflight says it first,
    naming every stage it would stop."""
    from flows.pipeline import PreflightFailed, _preflight
    from training import config

    params = config.resolve({"profile": "tiny"})
    monkeypatch.setenv("KILN_NPROC", "3")
    with pytest.raises(PreflightFailed) as err:
        _preflight(params)
    said = str(err.value)
    assert said.startswith("KILN_NPROC=3: train_vae.batch_size 32, train_clip.batch_size 128")
    assert "train_unet.batch_size 64" in said and "train_controlnet" not in said  # it is off
    monkeypatch.setenv("KILN_NPROC", "2")
    _preflight(params)  # 32, 128 and 64 split over 2: no error
    monkeypatch.setenv("KILN_NPROC", "0")  # was: ZeroDivisionError; the launcher runs one
    _preflight(params)
    monkeypatch.setenv("KILN_NPROC", "abc")  # was: passed, and stopped train_vae later
    with pytest.raises(PreflightFailed, match="KILN_NPROC must be a whole number, got 'abc'"):
        _preflight(params)
