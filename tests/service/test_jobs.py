"""Finalize and export jobs (unit): a run's progress lines, its end, and the ``job`` events, from a real
subprocess that prints what ``acqd finalize --progress-jsonl`` prints."""

from __future__ import annotations

import json
import subprocess
import sys

from acqd.service.jobs import Job, Jobs, job_reporter
from acqd.service.snapshot import EventBus


def _run(lines: list[dict], code: int = 0) -> subprocess.Popen:
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n"
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdout.write({text!r}); sys.exit({code})"],
                            stdout=subprocess.PIPE, text=True)


def test_a_run_reports_progress_then_its_report():
    events = EventBus()
    job = Job(_run([{"stage": "align", "fraction": 0.5}, {"report": {"ok": True}}]),
              on_progress=job_reporter(events, "finalize", "s1"))
    job.follow()
    assert (job.state, job.stage, job.fraction, job.report, job.error) == ("done", "align", 1.0, {"ok": True}, None)
    seen = [e.data for e in events.recent("job")]
    assert seen[0]["state"] == "running" and seen[-1] == {"kind": "finalize", "session": "s1", "state": "done",
                                                          "stage": "align", "fraction": 1.0, "error": None,
                                                          "time": seen[-1]["time"]}


def test_a_run_that_fails_says_why():
    job = Job(_run([{"stage": "seal", "fraction": 0.9}, {"error": "disk full"}], code=2))
    job.follow()
    assert (job.state, job.error) == ("failed", "disk full")
    silent = Job(_run([], code=3))
    silent.follow()
    assert (silent.state, silent.error) == ("failed", "exited with code 3")


def test_jobs_answer_for_one_run_or_all_of_a_kind():
    jobs = Jobs(EventBus())
    jobs[("finalize", "a")] = done = Job(_run([{"report": {"n": 1}}]))
    done.follow()
    assert jobs.status("finalize", "a")["report"] == {"n": 1}
    assert jobs.status("finalize", "b") == {"session": "b", "kind": "finalize", "state": "unknown"}
    assert jobs.status("finalize") == {"jobs": {"a": done.as_dict(with_report=False)}}
    assert jobs.status("export") == {"jobs": {}}
    assert jobs.listed() == [{"kind": "finalize", "session": "a", **done.as_dict(with_report=False),
                             "master_sha256": None}]  # an export run reports the master it was built from
    jobs.stop()  # every run is reaped
    assert done.proc.returncode == 0
