"""The playground's sampling: one worker thread takes jobs from a bounded queue.

One worker, because one sampling job already uses every core torch was given: two at
once would only thrash (RESULTS.md, "Torch threads"). A request that arrives while a
job runs waits in the queue, its position shown, taken round-robin across clients
(``fair.py``); past ``max_queue`` waiting jobs, or a client's share of them, the answer
is a clear "busy" (HTTP 429), never an unbounded backlog.

Images are drawn by ``sampling.generate`` with the same requests, batching and
scheduler construction as ``kiln generate``, so a playground image is the image ``kiln
generate`` draws for the same settings. Each job's pictures and a manifest line per
picture (``kiln generate``'s fields plus the job and the side of a comparison) are
kept under ``data/playground/``: the gallery.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import SAMPLER
from training.errors import UserError
from training.inference.defaults import scheduler_name
from training.playground.fair import FairQueue

MAX_IMAGES = 8  # images per prompt in one job
# A job's denoising steps (models x images x steps; the REST model's budget is 1,000):
# the defaults' 2 x 8 x 20 = 320 fit, 2 x 8 x 1,000 does not. One job holds the one
# worker; found in review: such jobs ran ~75 s each on the tiny model, and nine queued
# by one client kept every other client out for ten minutes.
MAX_JOB_STEPS = 2000
KEEP_PIPELINES = 2  # loaded pipelines kept (a comparison needs two)
KEEP_JOBS = 200  # finished jobs the server remembers (the gallery keeps them all)


@dataclass(frozen=True)
class Settings:
    """What the page asks for; ``check`` refuses what ``kiln generate`` would refuse."""

    prompt: str = ""  # check() refuses it empty
    negative: str = SAMPLER.negative_prompt
    seed: int = 0
    steps: int = SAMPLER.steps
    # None: each version at its own scale, the one its evaluation chose (a comparison
    # then shows both as they are served); the page sends one once the user sets it
    guidance: float | None = None
    # None: each version's own sampler, the one it was saved and evaluated with (as the
    # REST model and `kiln generate` sample); the page sends one once the user picks it
    scheduler: str | None = None
    n: int = 1

    def requests(
        self, own: float = SAMPLER.guidance, own_start: float = SAMPLER.guidance_start
    ) -> list:
        """The job's requests for a version whose own guidance is ``own`` from
        ``own_start`` on (the start is always the version's: the page sets the scale)."""
        from training.inference.sampling import Request

        g = own if self.guidance is None else self.guidance
        return [Request(self.prompt, self.seed + k, self.steps, g, self.negative,
                        guidance_start=own_start)
                for k in range(self.n)]  # fmt: skip

    def check(self) -> None:
        """``ValueError`` naming the field, before anything is queued."""
        from training.inference.sampling import (
            FLOW_SCHEDULERS,
            MAX_SEED,
            SCHEDULERS,
            check_request,
        )

        names = sorted({*SCHEDULERS, *FLOW_SCHEDULERS})
        if self.scheduler is not None and self.scheduler not in names:
            raise ValueError(f"unknown scheduler {self.scheduler!r} (choose {', '.join(names)})")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_IMAGES:
            raise ValueError(f"images must be a whole number from 1 to {MAX_IMAGES}")
        if isinstance(self.seed, int) and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED - self.n + 1} for {self.n} images")
        for r in self.requests():
            check_request(r)


@dataclass
class Job:
    id: str
    models: list[str]  # as asked: an alias, a version number, a models:/ URI
    settings: Settings
    versions: list[str]  # name/version each model resolved to when the job was queued
    state: str = "queued"  # queued | running | done | error | cancelled
    # what cancels it: given to the client that queued it only (the gallery shows job ids)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    done_steps: int = 0
    total_steps: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def view(self, position: int | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "position": position,
            "models": self.models,
            "versions": self.versions,
            "settings": self.settings.__dict__,
            "done_steps": self.done_steps,
            "total_steps": self.total_steps,
            "results": self.results,
            "error": self.error,
        }


class Cancelled(Exception):
    """Raised at the next denoising step of a job its client cancelled."""


FINISHED = ("done", "error", "cancelled")


class Worker:
    """The queue, the thread that empties it and the pipelines it keeps loaded."""

    def __init__(
        self, gallery: Path, max_queue: int = 8, max_per_client: int | None = None
    ) -> None:
        """``max_per_client``: jobs one client may keep waiting (default: half of
        ``max_queue``, rounded up, so one client cannot turn all others away)."""
        self.gallery = gallery
        self.images = gallery / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        share = (max_queue + 1) // 2 if max_per_client is None else max_per_client
        self.waiting = FairQueue(max_queue, share)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # guards jobs and waiting; the worker thread waits on it for a job
        self.lock = threading.Condition()
        self.pipes: OrderedDict[str, tuple[Any, dict]] = OrderedDict()
        self.dirs: dict[str, Path] = {}  # version -> its pipeline folder (downloaded once)
        self.dirs_lock = threading.Lock()
        self.fetching: dict[str, threading.Lock] = {}  # version -> its download's lock
        self.thread = threading.Thread(target=self._loop, name="playground-worker", daemon=True)
        self.thread.start()

    # ---- the request side --------------------------------------------------------------
    def submit(self, models: list[str], settings: Settings, client: str = "") -> Job:
        """Check and queue a job of ``client`` (its address); ``ValueError``/``UserError``
        for bad input, ``Busy`` when ``max_queue`` jobs, or the client's share, already
        wait, ``ConnectionError`` without a registry."""
        settings.check()
        if (cost := len(models) * settings.n * settings.steps) > MAX_JOB_STEPS:
            raise ValueError(
                f"a job is at most {MAX_JOB_STEPS} denoising steps (models x images x steps); "
                f"this one is {cost}: fewer images or steps"
            )
        from training.tracking.versions import resolve_version

        versions = [resolve_version(m) for m in models]  # a missing version fails now
        job = Job(uuid.uuid4().hex[:12], models, settings, versions)
        with self.lock:
            self.waiting.push(client, job)  # Busy when full
            self.jobs[job.id] = job
            self._forget_finished()
            self.lock.notify()
        return job

    def _forget_finished(self) -> None:
        """Drop the oldest finished jobs past ``KEEP_JOBS`` (under ``self.lock``). A
        queued or running job is never dropped, whatever its age: its client still polls
        it and the worker still draws it. Those are bounded anyway (``max_queue`` waiting,
        one running), so ``self.jobs`` holds at most KEEP_JOBS + max_queue + 1."""
        excess = len(self.jobs) - KEEP_JOBS
        if excess <= 0:
            return
        finished = [i for i, j in self.jobs.items() if j.state in FINISHED]
        for job_id in finished[:excess]:  # oldest first: the dict keeps submission order
            del self.jobs[job_id]

    def cancel(self, job_id: str, token: str) -> bool | None:
        """Cancel a queued or running job (None: no such job; False: the token is not
        its own). A queued one is skipped; a running one stops at its next step."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if token != job.token:
                return False
            if job.state not in FINISHED:
                job.cancelled = True
                if job.state == "queued":
                    job.state = "cancelled"
                    self.waiting.remove(job)
            return True

    def view(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            return job.view(self.waiting.position(job))

    # ---- the worker thread -------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while (job := self.waiting.pop()) is None:
                    self.lock.wait()
                job.state = "running"  # a cancelled job has left the queue already
            try:
                self._run(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except (UserError, ValueError, TimeoutError, ConnectionError) as exc:
                job.error, job.state = str(exc), "error"
            except Exception as exc:  # a bug must not kill the worker: say it on the page
                job.error, job.state = f"{type(exc).__name__}: {exc}", "error"

    def pipeline_dir(self, version: str) -> Path:
        """The pipeline folder of ``name/version``, fetched from the registry once. Only
        callers of the same version wait for its download (was: one lock for all, so a
        large version's download held every page load, and with enough of them
        uvicorn's threads, job polling included)."""
        with self.dirs_lock:
            if version in self.dirs:
                return self.dirs[version]
            fetching = self.fetching.setdefault(version, threading.Lock())
        with fetching:
            with self.dirs_lock:
                if version in self.dirs:  # fetched while this caller waited
                    return self.dirs[version]
            from training.tracking.versions import pipeline_dir

            folder = pipeline_dir(f"models:/{version}")[0]
            with self.dirs_lock:
                self.dirs[version] = folder
            return folder

    def _pipeline(self, version: str):
        """The loaded pipeline of ``name/version``, its scheduler as saved and its own
        sampler defaults (``inference/defaults.py``: the guidance evaluate chose)."""
        if version in self.pipes:
            self.pipes.move_to_end(version)
            return self.pipes[version]
        from training.inference import sampling
        from training.inference.defaults import recommended

        folder = self.pipeline_dir(version)
        pipe = sampling.load(folder)
        entry = (pipe, pipe.scheduler, recommended(folder))
        self.pipes[version] = entry
        while len(self.pipes) > KEEP_PIPELINES:
            self.pipes.popitem(last=False)
        return entry

    def _run(self, job: Job) -> None:
        from training.inference import sampling

        s = job.settings
        loaded = []
        for version in job.versions:
            pipe, saved, own = self._pipeline(version)
            # the version's own unless one is named, then made from the saved config, as
            # `kiln generate` does after a fresh load (a scheduler made from another
            # sampler's config is not the same sampler). generate never steps `saved`
            # itself: it samples on a fresh scheduler of the same config.
            named = s.scheduler is not None
            pipe.scheduler = sampling.make_scheduler(s.scheduler, saved.config) if named else saved
            used = scheduler_name(type(pipe.scheduler).__name__, pipe.scheduler.config)
            reqs = s.requests(own.guidance, own.guidance_start)
            try:  # the version's own scale (its kiln_sampler.json) is known only now
                for r in reqs:
                    sampling.check_request(r)
            except ValueError as exc:
                raise ValueError(
                    f"{version}'s own sampler setting: {exc}; set a guidance"
                ) from None
            loaded.append((pipe, reqs, used))
            job.total_steps += sampling.total_steps(pipe, reqs)

        def advance(k: int) -> None:
            job.done_steps += k
            if job.cancelled:
                raise Cancelled

        kept = 0  # the job's pictures in the gallery, for the message of a full disk
        for side, (model, version, (pipe, reqs, used)) in enumerate(
            zip(job.models, job.versions, loaded, strict=True)
        ):
            images = sampling.generate(pipe, reqs, progress=advance)
            files = []
            for k, (r, img) in enumerate(zip(reqs, images, strict=True)):
                name = f"{job.id}-{side}-{k}-{sampling.slug(r.prompt, 32)}-{r.seed}.png"
                self._keep(job, side, (model, version, used), r, img, name, kept)
                files.append({"file": f"images/{name}", "seed": r.seed, "guidance": r.guidance,
                              "guidance_start": r.guidance_start, "scheduler": used})  # fmt: skip
                kept += 1
            note = _truncation_note(pipe, s)
            job.results.append({"model": model, "version": version, "images": files, "note": note,
                                "scheduler": used})  # fmt: skip

    def _keep(self, job: Job, side: int, drawn: tuple, r, img, name: str, kept: int) -> None:
        """Write the picture ``name`` into the gallery and its manifest line, both or
        neither (``disk.save_picture``, as ``kiln generate``): on a full disk the job's
        error says so, and how many of its pictures (``kept``) are whole and listed.
        ``drawn``: (the model as asked, the version, the sampler it was drawn with)."""
        from training.disk import save_picture
        from training.inference.sampling import manifest_line

        model, version, used = drawn
        line = manifest_line(f"images/{name}", r, img, used, model, version)
        line |= {
            "job": job.id,
            "side": side,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # unbuffered: the line is on disk or cut off again, never left in a buffer whose
        # flush at closing fails; locked, as kiln generate's, while it is appended
        with open(self.gallery / "manifest.jsonl", "ab", buffering=0) as manifest:
            fcntl.flock(manifest, fcntl.LOCK_EX)
            save_picture(self.images / name, img, manifest, line, kept, "draw again")

    def recent(self, limit: int = 24) -> list[dict[str, Any]]:
        """The gallery's newest pictures (manifest lines whose file still exists)."""
        path = self.gallery / "manifest.jsonl"
        if not path.is_file():
            return []
        out = []
        for text in reversed(path.read_text().splitlines()):
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if (self.gallery / line.get("file", "")).is_file():
                out.append(line)
            if len(out) >= limit:
                break
        return out


def _truncation_note(pipe, s: Settings) -> str | None:
    """Say so when the text encoder reads only the start of the prompt or of the
    negative prompt (``inference/text.cut_notes``)."""
    from training.inference.text import cut_notes

    return "; ".join(cut_notes(pipe.tokenizer, s.prompt, s.negative)) or None
