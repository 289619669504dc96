"""Background jobs: progress of the work's own bars reaches the status, errors become one line,
and the worker is a thread (never a fork)."""

from __future__ import annotations

import threading
import time

from scdrugmap.errors import UserError
from scdrugmap.progress import progress_bar
from scdrugmap.serve.jobs import Jobs


def _wait(jobs, job, states=("done", "failed")):
    deadline = time.monotonic() + 30
    while jobs.get(job.id).state not in states:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return jobs.get(job.id).status()


def test_progress_of_the_work_reaches_the_status():
    jobs = Jobs()
    halfway, go_on = threading.Event(), threading.Event()
    seen = {}

    def work(progress):
        progress(1, "extracting")
        with progress_bar("pca · pc9", total=4, enabled=False) as advance:   # disabled on a terminal: still reported
            advance(2)
            seen["thread"] = threading.current_thread().name
            halfway.set()
            go_on.wait(10)
            advance(2)
        return {"answer": 42}

    job = jobs.submit("test", "a test", 2, work)
    assert halfway.wait(10)
    status = jobs.get(job.id).status()
    assert status["state"] == "running" and status["message"] == "extracting"
    assert status["detail"] == "pca · pc9: 2 of 4" and status["fraction"] == 0.5
    go_on.set()
    status = _wait(jobs, job)
    assert status["state"] == "done" and status["step"] == 2 and jobs.get(job.id).result == {"answer": 42}
    assert seen["thread"].startswith("scdrugmap-job")
    # outside a job, a disabled bar reports nothing
    with progress_bar("x", total=1, enabled=False) as advance:
        advance(1)
    jobs.shutdown()


def test_a_failing_job_keeps_one_line():
    jobs = Jobs()

    def refused(progress):
        raise UserError("dataset 'x' is\n already in the store")

    def broken(progress):
        raise ValueError("boom")

    a, b = jobs.submit("t", "refused", 1, refused), jobs.submit("t", "broken", 1, broken)
    assert _wait(jobs, a)["error"] == "dataset 'x' is already in the store"
    assert _wait(jobs, b)["error"] == "ValueError: boom"
    assert jobs.get("nope") is None
    jobs.shutdown()


def test_the_server_answers_while_a_page_waits_for_a_busy_index(store_copy):
    import concurrent.futures

    import pytest

    pytest.importorskip("uvicorn", reason="scdrugmap[serve] is not installed")
    from webapp import http, running

    from scdrugmap.store.store import Store

    st = store_copy()
    with running(st) as base:
        store = Store.open(st)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with store.transaction():                        # the index is held, as by a job's write
                waiting = pool.submit(http, f"{base}/")
                time.sleep(0.5)
                assert not waiting.done()                    # the datasets page waits for the index ...
                t = time.perf_counter()
                r = http(f"{base}/jobs/0123456789abcdef.json")
                assert r.status == 404 and time.perf_counter() - t < 1.0      # ... the server does not
            assert waiting.result(30).status == 200          # and it is answered once the index is free
