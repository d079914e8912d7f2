"""Load benchmark: job reads while a trainer runs, against /api/health as the baseline.

Starts a real server (``python -m server`` on a free loopback port, temporary data directory),
submits a tiny Stage 1 job with far more steps than the benchmark needs so that a trainer is
busy the whole time, waits until it runs, then hits ``GET /api/jobs/{id}`` from ``--clients``
concurrent clients (each its own connection) for ``--seconds``, and the same load against
``GET /api/health``. It prints requests/s, p50 and p99 latency of both and their ratio, then
cancels the job and stops the server and trainer. It also reports the largest gap between the
trainer's progress events while job reads ran: load must not starve the trainer's heartbeat.

    .venv/bin/python bench/server_load.py --clients 16 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
# Plenty for any benchmark length: the job is cancelled at the end, it never has to finish.
TRAINER_STEPS = 1_000_000


@dataclass
class LoadResult:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        if len(self.latencies_s) == 1:
            return self.latencies_s[0] * 1000
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[int(q) - 1] * 1000

    def line(self) -> str:
        return (f"{self.name:<22} {self.rps:9.1f} req/s   p50 {self.percentile_ms(50):7.2f} ms   "
                f"p99 {self.percentile_ms(99):7.2f} ms   ({self.requests} ok, {self.errors} errors)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen) -> None:
    """Poll ``predicate`` until it is true; fail if the server died or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} while waiting for {what}")
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


async def _worker(url: str, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    # One AsyncClient per worker: separate connection pools, like separate browser tabs.
    async with httpx.AsyncClient(timeout=10.0) as client:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                response = await client.get(url)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(1)


async def run_load(name: str, url: str, clients: int, seconds: float) -> LoadResult:
    """Hit ``url`` from ``clients`` concurrent clients for ``seconds``."""
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_worker(url, stop_at, latencies, errors) for _ in range(clients)))
    return LoadResult(name, len(latencies), len(errors), time.perf_counter() - started, latencies)


def stop_everything(process: subprocess.Popen, base_url: str, job_id: int | None) -> None:
    """Cancel the job, stop the server, then make sure no trainer outlives it."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if job_id is not None and process.poll() is None:
        try:
            httpx.post(f"{base_url}/api/jobs/{job_id}/cancel", timeout=5)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = httpx.get(f"{base_url}/api/jobs/{job_id}", timeout=5).json()["status"]
                if status in ("cancelled", "failed", "succeeded"):
                    break
                time.sleep(0.3)
        except httpx.HTTPError:
            pass  # the server is going down anyway; the kill below still cleans up
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    # Trainers run in their own process groups, so stopping the server does not signal them;
    # anything the server started and left behind is ours to end.
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(descendants, timeout=5)


@dataclass
class Measurement:
    job: LoadResult
    health: LoadResult
    largest_progress_gap_s: float
    status: str
    cpus: int

    def lines(self) -> list[str]:
        ratio = self.job.rps / self.health.rps if self.health.rps else float("nan")
        lines = [self.job.line(), self.health.line(),
                 f"job reads / health: {ratio:.2f}x throughput, "
                 f"p99 {self.job.percentile_ms(99) / self.health.percentile_ms(99):.2f}x latency",
                 f"largest gap between the trainer's progress events under job-read load: "
                 f"{self.largest_progress_gap_s:.2f} s (it reports every {LOG_EVERY_S:g} s)"]
        if self.status != "running":
            lines.append(f"warning: the job was {self.status!r}, not running, by the end of the job-read load")
        return lines


# The trainer's report interval: a gap much longer than this under load is the server starving it.
LOG_EVERY_S = 0.5


def largest_progress_gap(base_url: str, job_id: int, start: float, end: float) -> float:
    """The longest wait between the trainer's consecutive progress events stored in [start, end]
    (POSIX seconds): how long the load kept the trainer's reports out."""
    from datetime import datetime
    stamps, after = [], 0
    while True:
        events = httpx.get(f"{base_url}/api/jobs/{job_id}/events", params={"after_id": after, "limit": 5000},
                           timeout=10).json()["data"]
        if not events:
            break
        after = events[-1]["id"]
        stamps += [datetime.fromisoformat(e["created_at"].replace("Z", "+00:00")).timestamp()
                   for e in events if e["kind"] == "progress"]
    inside = [t for t in stamps if start <= t <= end]
    edges = [start, *inside, end]
    return max(b - a for a, b in zip(edges, edges[1:]))


def measure(clients: int, seconds: float) -> Measurement:
    """Start a server and a tiny training, load job reads then /api/health; stop everything."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="neurolens-bench-") as tmp:
        data_dir, log_path = Path(tmp) / "data", Path(tmp) / "server.log"
        process = start_server(data_dir, port, log_path)
        job_id: int | None = None
        try:
            wait_until(lambda: httpx.get(f"{base_url}/api/health", timeout=1).status_code == 200,
                       30, "the server to answer /api/health", process)
            response = httpx.post(f"{base_url}/api/jobs", timeout=10, json={
                "stage": "stage1", "dataset": "synthetic",
                "config": {"preset": "tiny", "steps": TRAINER_STEPS, "checkpoint_every": TRAINER_STEPS,
                           "log_every_s": LOG_EVERY_S},
            })
            response.raise_for_status()
            job_id = response.json()["id"]
            job_url = f"{base_url}/api/jobs/{job_id}"
            # Running and past its start-up: its progress reports come at their steady rate.
            wait_until(lambda: httpx.get(job_url, timeout=5).json()["progress"]["step"] > 0,
                       180, f"job {job_id} to take its first step", process)
            cpus = httpx.get(f"{base_url}/api/system", timeout=5).json()["cpu_count"]
            started = time.time()
            job_result = asyncio.run(run_load(f"GET /api/jobs/{job_id}", job_url, clients, seconds))
            gap = largest_progress_gap(base_url, job_id, started, time.time())
            status = httpx.get(job_url, timeout=5).json()["status"]
            health_result = asyncio.run(run_load("GET /api/health", f"{base_url}/api/health", clients, seconds))
        except Exception:
            print(f"--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise
        finally:
            stop_everything(process, base_url, job_id)
    return Measurement(job_result, health_result, gap, status, cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per endpoint (default 20)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be at least 1 and --seconds greater than 0")
    print(f"{args.clients} clients x {args.seconds:g} s per endpoint, against a running tiny training")
    result = measure(args.clients, args.seconds)
    print(f"{result.cpus} CPUs")
    print("\n".join(result.lines()))
    return 0 if result.job.errors == 0 and result.health.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
