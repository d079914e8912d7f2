"""The ``neurolens`` CLI as a person and a script meet it: in an 80-column pseudo-terminal, and
through a pipe, as a real process against a real server and trainer."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT, RunningServer

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# Slow enough to be seen running for a few seconds, with progress every 0.2 s.
JOB = {"preset": "tiny", "steps": 60, "batch_size": 8, "probe_words": 0, "log_every_s": 0.2, "checkpoint_every": 1000}


def neurolens(server: RunningServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI through pipes: no terminal, as in a script or a CI log."""
    return subprocess.run([sys.executable, "-m", "clients.cli", "--server", server.url, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "80"})


def neurolens_in_terminal(server: RunningServer, *args: str, timeout: float = 120) -> list[str]:
    """The CLI in an 80x24 pseudo-terminal; the screen's lines as printed, escapes removed."""
    leader, follower = pty.openpty()
    os.set_inheritable(follower, True)
    # The size the terminal reports (TIOCSWINSZ) is what rich measures, not only $COLUMNS.
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "clients.cli", "--server", server.url, *args], cwd=REPO_ROOT,
                               stdin=follower, stdout=follower, stderr=follower, env={**env, "TERM": "xterm-256color"})
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(leader)
    text = ANSI.sub("", output.decode("utf-8", errors="replace"))
    # A live bar redraws its line with carriage returns; each redraw is a line as seen.
    return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def submit(server: RunningServer, **overrides) -> int:
    with server.client() as http:
        response = http.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic", "config": {**JOB, **overrides}})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_until(server: RunningServer, job_id: int, done, timeout: float = 120) -> None:
    with server.client() as http:
        deadline = time.monotonic() + timeout
        while not done(http.get(f"/api/jobs/{job_id}").json()):
            assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s"
            time.sleep(0.2)


def test_in_an_80_column_terminal_jobs_and_watch_fit_and_each_change_says_what_happened(server: RunningServer) -> None:
    job_id = submit(server)
    wait_until(server, job_id, lambda job: job["progress"]["step"] >= 2)
    with server.client() as http:  # a queued job with a reason: the longest status there is
        waiting = http.post("/api/jobs", json={"stage": "stage2", "dataset": "synthetic", "after": job_id,
                                               "config": {"preset": "tiny"}}).json()["id"]
    listed = neurolens_in_terminal(server, "jobs")
    assert max(len(line) for line in listed) <= 80, listed
    rows = {number: [line for line in listed if re.match(rf"\s*{number}\s", line)] for number in (job_id, waiting)}
    assert len(rows[job_id]) == 1 and "running" in rows[job_id][0], listed
    assert len(rows[waiting]) == 1 and f"queued (after {job_id})" in rows[waiting][0], listed
    assert not [line for line in listed if re.match(r"\s+│", line)], listed  # no cell wrapped onto a second line
    assert any(f"Job {waiting} cancelled." in line for line in neurolens_in_terminal(server, "cancel", str(waiting)))

    paused = neurolens_in_terminal(server, "pause", str(job_id))
    assert any(f"Pause requested: job {job_id} checkpoints at its next step" in line for line in paused), paused
    wait_until(server, job_id, lambda job: job["status"] == "paused")
    resumed = neurolens_in_terminal(server, "resume", str(job_id))
    assert any(f"Job {job_id} is queued again; it continues from its newest checkpoint" in line
               for line in resumed), resumed

    watched = neurolens_in_terminal(server, "watch", str(job_id), "--interval", "0.3")
    assert any(f"Job {job_id} succeeded." in line for line in watched), watched
    assert any("60/60" in line and "loss" in line and "peak" in line for line in watched), watched
    assert max(len(line) for line in watched) <= 80, [line for line in watched if len(line) > 80]


def test_through_a_pipe_watch_prints_plain_lines_and_json_and_follow_work(server: RunningServer) -> None:
    assert re.fullmatch(r"neurolens \d+\.\d+\.\d+\n", neurolens(server, "--version").stdout)
    job_id = submit(server)
    whole = str(16 * 1024**2)
    # Followed from the start, while it trains: what it prints ends up being the whole log.
    follower = subprocess.Popen([sys.executable, "-m", "clients.cli", "--server", server.url, "logs", str(job_id),
                                 "--follow", "--tail-bytes", whole], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        watched = neurolens(server, "watch", str(job_id), "--interval", "0.3")
        assert watched.returncode == 0, watched.stderr
        lines = watched.stdout.splitlines()
        progress = [line for line in lines if re.match(rf"job {job_id} running \d+/60", line)]
        assert len(progress) >= 3, lines  # a line per change, none redrawn in place
        assert "\r" not in watched.stdout and "\x1b" not in watched.stdout
        assert lines[-1] == f"Job {job_id} succeeded."

        followed, errors = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, errors
    assert followed == neurolens(server, "logs", str(job_id), "--tail-bytes", whole).stdout
    assert "resumed" not in followed and followed.count("\n") >= 3

    jobs = json.loads(neurolens(server, "jobs", "--json").stdout)
    assert [job["id"] for job in jobs] == [job_id]
    status = json.loads(neurolens(server, "status", str(job_id), "--json").stdout)
    assert status["status"] == "succeeded" and status["progress"]["step"] == 60
    artifacts = json.loads(neurolens(server, "artifacts", "--job", str(job_id), "--json").stdout)
    assert {a["kind"] for a in artifacts} >= {"encoder"}

    # Every listing pages, and says how many there are in all.
    with server.client() as http:
        every = http.get(f"/api/jobs/{job_id}/events", params={"limit": 5000}).json()
        assert every["count"] == len(every["data"]) > 10
        paged, after = [], 0
        while True:
            page = http.get(f"/api/jobs/{job_id}/events", params={"limit": 7, "after_id": after}).json()
            assert page["count"] == every["count"] - len(paged)
            paged += page["data"]
            if len(page["data"]) < 7:
                break
            after = page["data"][-1]["id"]
        assert paged == every["data"]
        for path in ("/api/jobs", "/api/artifacts"):
            beyond = http.get(path, params={"offset": 1000}).json()
            assert beyond["data"] == [] and beyond["count"] >= 1
