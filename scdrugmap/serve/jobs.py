"""Background work of the web app (upload + extract + predict, probe runs) with progress state.

Jobs run one at a time in a single worker thread (never a forked process: the server has
threads), so two jobs never write the index at once and the server keeps answering pages.
A page polls :meth:`Jobs.status` through a small JSON endpoint.
"""

from __future__ import annotations

import secrets
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import UserError
from ..progress import report_to


@dataclass
class Job:
    id: str
    kind: str
    title: str
    state: str = "queued"              # queued, running, done, failed
    step: int = 0
    total: int = 1
    message: str = "waiting for the worker"
    detail: str = ""                   # the current progress bar of the work: "<what>: done of total"
    fraction: float = 0.0              # of that bar
    error: str | None = None
    result: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def status(self) -> dict:
        return {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "step": self.step,
                "total": self.total, "message": self.message, "detail": self.detail,
                "fraction": round(self.fraction, 4), "error": self.error,
                "seconds": round((self.finished or time.time()) - self.started, 2)}


class Progress:
    """What a job's function calls to report where it is: ``progress(step, message)``."""

    def __init__(self, job: Job, lock: threading.Lock):
        self.job, self.lock = job, lock

    def __call__(self, step: int, message: str) -> None:
        with self.lock:
            self.job.step = step
            self.job.message = message
            self.job.detail, self.job.fraction = "", 0.0

    def steps(self, total: int) -> None:
        """The number of steps, once the work knows it."""
        with self.lock:
            self.job.total = max(1, total)

    def bar(self, description: str, done: int, total: int) -> None:
        """Where the work's own progress bar is (:func:`scdrugmap.progress.report_to`)."""
        with self.lock:
            self.job.detail = f"{description}: {done:,} of {total:,}"
            self.job.fraction = min(1.0, done / total) if total else 0.0


class Jobs:
    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scdrugmap-job")

    def submit(self, kind: str, title: str, total: int, work) -> Job:
        """Queue ``work(progress) -> dict`` (its result); a :class:`UserError` becomes the job's
        one-line error, anything else the error's last line (the traceback stays in the server log)."""
        job = Job(id=secrets.token_hex(8), kind=kind, title=title, total=total)
        with self._lock:
            self._jobs[job.id] = job

        def run():
            with self._lock:
                job.state, job.message, job.started = "running", "starting", time.time()
            progress = Progress(job, self._lock)
            try:
                with report_to(progress.bar):
                    result = work(progress)
            except UserError as e:
                self._finish(job, "failed", error=" ".join(str(e).split()))
            except Exception as e:             # noqa: BLE001 (shown in the page, logged in full)
                traceback.print_exc()
                self._finish(job, "failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
            else:
                self._finish(job, "done", result=result or {})

        self._pool.submit(run)
        return job

    def _finish(self, job: Job, state: str, error: str | None = None, result: dict | None = None) -> None:
        with self._lock:
            job.state, job.error, job.finished = state, error, time.time()
            if result is not None:
                job.result = result
                job.step = job.total
                job.message = "done"

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
