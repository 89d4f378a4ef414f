"""A continuing run vs a from-scratch run on the same data (issue #16).

Usage (from the repository root, alone on the machine; ~40 minutes on 2 cores):
    .venv/bin/python benchmarks/continuous.py [--n 4000]

The shapes set as a user brings it: a URL list on a loopback server (tests/
test_continuous.py's), graded by the shapes oracle, tiny profile at its full budget.
Project A trains the champion from scratch on the pairs without the held-out
colour-shape pairs; the list then gains them (1/6 of the rows) and A runs ``kiln run
--mode continue``. Project B, a fresh copy, runs ``kiln run --mode scratch`` on the
final list. The two timed runs end on the same data; the printout has the wall time of
each ``kiln run``, their stage seconds and their accuracies, and the ratio, all measured
in this one invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from tests.conftest import BIN, copy_project, counting_server, project_env  # noqa: E402
from tests.test_continuous import N, _rows  # noqa: E402
from training import config, stages  # noqa: E402

SETTINGS = {
    "ingest.dataset": "url-list",
    "ingest.allow_networks": ["127.0.0.1/32"],
    "validate.near_duplicates": "off",  # jittered renders are near-duplicates by design
    "evaluate.oracle": "shapes",
}


def _run(project: Path, *args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "kiln"), "run", *args], cwd=project, env=project_env(project),
        capture_output=True, text=True,
    )  # fmt: skip
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kiln run {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return took


def _metrics(project: Path) -> dict:
    out = {}
    for s in stages.NAMES:
        path = project / "data" / "metrics" / f"{s}.json"
        out[s] = json.loads(path.read_text()) if path.is_file() else {}
    return out


def _row(name: str, wall: float, m: dict) -> str:
    secs = " / ".join(f"{m[s].get('stage_seconds', 0):.0f}" for s in stages.NAMES)
    ev = m["evaluate"]
    held_out = ev.get("acc_all_held_out", float("nan"))  # none drawn: its reason instead
    encoded = m["precompute_latents"].get("latents_encoded", "—")
    seen = ev["acc_all_seen"]
    return f"| {name} | {wall:.0f} | {secs} | {seen:.3f} | {held_out:.3f} | {encoded} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=N, help="shapes rendered (1/6 held-out pairs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, counting_server({}) as base_url:
        tmp = Path(tmp)
        seen, held = _rows(base_url, args.n)
        source = tmp / "pairs.parquet"
        a, b = copy_project(tmp / "a"), copy_project(tmp / "b")
        for p in (a, b):
            config.set_values(p / "params.yaml", {**SETTINGS, "ingest.source": str(source)})
        pd.DataFrame(seen).to_parquet(source)
        first = _run(a, "--mode", "scratch")
        m_first = _metrics(a)
        pd.DataFrame(seen + held).to_parquet(source)
        cont = _run(a, "--mode", "continue")
        m_cont = _metrics(a)
        scratch = _run(b, "--mode", "scratch")
        m_scratch = _metrics(b)
    print(f"rows: {len(seen)} without the held-out pairs, then +{len(held)} with them")
    print(
        "| run | kiln run s | stage s (" + " / ".join(stages.NAMES) + ") | acc seen "
        "| acc held-out | latents encoded |"
    )
    print("|---|---:|---|---:|---:|---:|")
    print(_row("champion: scratch, without the held-out pairs", first, m_first))
    print(_row("continue from it, + held-out pairs", cont, m_cont))
    print(_row("scratch on the same final data", scratch, m_scratch))
    print(f"continue / scratch wall time: {cont / scratch:.2f}")


if __name__ == "__main__":
    main()
