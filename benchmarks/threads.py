"""Torch's CPU threads when trainings share the machine: torch's default vs Kiln's sizing.

Usage (from the repository root; about 15 minutes with the defaults on a 2-core machine):
    .venv/bin/python benchmarks/threads.py [--seconds 15] [--rounds 2] [--only alone]

Each worker is a separate process running the tiny profile's VAE training step (encode,
reparameterise, decode, MSE + KL, backward, AdamW: ``train_vae``'s step on random
32 px images, batch 64) for a fixed wall-clock window. The workers of one scenario
start together and wait for a common start time after their imports, so their
windows overlap exactly. Per worker: steps/s in the window (after two warm-up steps).

Scenarios (interleaved over ``--rounds`` so that machine noise hits all of them):
  alone, torch default  one worker, torch as it comes: all cores, OpenMP threads
                        spinning at barriers
  alone, kiln           one worker as a Kiln stage runs: ``env.offline_defaults()``
                        before torch loads, then ``engine.set_torch_threads()``
                        (affinity, cgroup quota, ranks on this machine)
  alone, OMP=1 / passive / spin 1k   one worker with one thread, with threads that sleep
                        at barriers (OMP_WAIT_POLICY=PASSIVE), or that spin only 1000
                        iterations first (GOMP_SPINCOUNT): candidate defaults
  2 x ...               two independent workers at once (two stages or two checkouts
                        training on one machine: what the issue measured), as above
  2 x kiln ranks        two workers as torchrun starts them on one machine
                        (LOCAL_WORLD_SIZE=2, the KILN_NPROC case): cores / 2 threads each
  2 x kiln, KILN_THREADS=1   two independent Kiln stages each told its share

Kiln's thread count for an independent worker equals torch's default on a machine
without a CPU quota: a process cannot see unrelated ones, and a count that followed the
load would make a resumed run differ from the run it resumes. Figures are ratios within
one run; the machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS: dict[str, tuple[int, str, dict[str, str]]] = {
    # name: (processes, thread policy, extra environment)
    "alone, torch default": (1, "default", {}),
    "alone, kiln": (1, "kiln", {}),
    "alone, OMP=1": (1, "default", {"OMP_NUM_THREADS": "1"}),
    "alone, passive": (1, "default", {"OMP_WAIT_POLICY": "PASSIVE"}),
    # libgomp spins ~300k iterations at a barrier before it sleeps
    "alone, spin 1k": (1, "default", {"GOMP_SPINCOUNT": "1000"}),
    "2 x torch default": (2, "default", {}),
    "2 x passive": (2, "default", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 x spin 1k": (2, "default", {"GOMP_SPINCOUNT": "1000"}),
    "2 x kiln ranks": (2, "kiln", {"LOCAL_WORLD_SIZE": "2"}),
    "2 x kiln, KILN_THREADS=1": (2, "kiln", {"KILN_THREADS": "1"}),
}


def worker(policy: str, start_at: float, seconds: float) -> None:
    """One training-like process: prints {"threads", "steps", "steps_per_s"} as JSON."""
    sys.path.insert(0, str(ROOT))
    if policy == "kiln":  # as `kiln` does: before torch (and its OpenMP runtime) loads
        from training.env import offline_defaults

        offline_defaults()
    import torch
    import torch.nn.functional as F

    from training import config
    from training import engine as E
    from training.phases import vae

    if policy == "kiln":
        E.set_torch_threads()
    params = config.resolve({"profile": "tiny"})
    c = params.train_vae
    torch.manual_seed(0)
    model = vae.build(params)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr)
    size = params.ingest.image_size
    x = torch.rand(c.batch_size, 3, size, size) * 2 - 1

    def step() -> None:
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        loss = F.mse_loss(model.decode(z).sample, x) + c.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        step()
    time.sleep(max(0.0, start_at - time.time()))
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    elapsed = time.perf_counter() - t0
    print(json.dumps({"threads": torch.get_num_threads(), "steps": n, "steps_per_s": n / elapsed}))


def scenario(name: str, seconds: float, settle: float) -> list[dict]:
    procs, policy, extra = SCENARIOS[name]
    clear = (
        "OMP_NUM_THREADS",
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "KILN_THREADS",
        "KILN_USER_OMP_NUM_THREADS",
    )
    env = {k: v for k, v in os.environ.items() if k not in clear}
    env.update(extra)
    start_at = time.time() + settle  # after every worker has imported and warmed up
    cmd = [sys.executable, __file__, "--worker", policy, str(start_at), str(seconds)]
    running = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(procs)
    ]
    out = []
    for p in running:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: a worker failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window per scenario")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=25.0, help="seconds for imports + warm-up")
    ap.add_argument("--only", default="", help="run the scenarios whose name contains this")
    args = ap.parse_args()
    names = [n for n in SCENARIOS if args.only in n]
    sys.path.insert(0, str(ROOT))
    from training.env import thread_plan

    plan = thread_plan({})
    print(
        f"CPUs available: {plan.cpus} (affinity {len(os.sched_getaffinity(0))}, "
        f"os.cpu_count {os.cpu_count()}); load average before: {os.getloadavg()}",
        flush=True,
    )
    results: dict[str, list[list[dict]]] = {name: [] for name in names}
    t_all = time.perf_counter()
    for r in range(args.rounds):
        for name in names:
            res = scenario(name, args.seconds, args.settle)
            results[name].append(res)
            rates = ", ".join(f"{w['steps_per_s']:.2f}" for w in res)
            threads = "+".join(str(w["threads"]) for w in res)
            print(f"round {r + 1} {name:20s} threads {threads:5s} steps/s {rates}", flush=True)
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - t_all:.0f} s in all")

    first = results[names[0]]  # "alone, torch default" unless --only leaves it out
    base = statistics.median(res[0]["steps_per_s"] for res in first)
    head = "| scenario | threads per process | steps/s per process | total steps/s"
    print(f"\n{head} | vs {names[0]} |")
    print("|---|---|---:|---:|---:|")
    for name, rounds in results.items():
        per = statistics.median(w["steps_per_s"] for res in rounds for w in res)
        total = statistics.median(sum(w["steps_per_s"] for w in res) for res in rounds)
        threads = "+".join(str(w["threads"]) for w in rounds[0])
        print(f"| {name} | {threads} | {per:.2f} | {total:.2f} | {total / base:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
