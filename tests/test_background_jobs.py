"""The suite's background compile jobs (tests/conftest.py): they must run in the tests' own session at the lowest
priority. A job started in a new session (start_new_session=True, as before fea69d0) is, under the kernel's
autogroup scheduling, a scheduling group of its own that gets half the CPU whatever its nice value: the tests'
2-thread torch work then ran ~20x slower while a job ran. Own process group, so that a kill reaches its children."""
import os
import shutil
import sys
import time

import pytest

import conftest


@pytest.mark.skipif(shutil.which("nice") is None, reason="needs the nice utility")
def test_background_job_shares_the_session_but_not_the_process_group():
    name = "probe_session_test"
    assert not conftest._known(name)
    conftest._popen(name, ["nice", "-n", "19", sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    proc, path, _ = conftest._JOBS.pop(name)
    try:
        assert proc.poll() is None
        assert os.getsid(proc.pid) == os.getsid(0), "a job in another session escapes nice under autogroup scheduling"
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0), "a job needs its own process group for killpg"
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, proc.pid) != 19 and time.monotonic() < deadline:
            time.sleep(0.05)  # `nice` sets the priority, then execs python under the same pid
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
    finally:
        conftest._kill(proc)
        os.remove(path)
    assert proc.returncode == -9


def test_queued_jobs_run_under_nice(monkeypatch):
    # what _start_job queues: the command behind `nice -n 19`, started by _popen (checked above)
    monkeypatch.setattr(conftest, "_QUEUE", [])
    monkeypatch.setattr(conftest, "_pump", lambda: None)
    conftest._start_job("probe_queue_test", lambda: [["true"], {"X_PROBE": "1"}])
    (name, cmd, env), = conftest._QUEUE
    assert name == "probe_queue_test" and env["X_PROBE"] == "1"
    assert cmd == (["nice", "-n", "19", "true"] if shutil.which("nice") else ["true"])
