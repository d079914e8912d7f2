"""Transfer benchmark: a ~1 GB encoder artifact over loopback, down and up, against a file copy.

Starts a real server (``python -m server`` on a free loopback port, temporary data directory),
writes a valid full-size encoder file (the ``large`` preset, about 270M float32 parameters,
random weights, streamed to disk so this script stays small too), then measures, each ``--runs``
times, median reported, every figure also as a ratio to the file copy:

- ``copy``: ``shutil.copyfile`` of the stored artifact file, the ceiling for moving those bytes;
  ``copy + sha256``: the same and a sha256 of it, what a verified copy costs;
- ``download``: :meth:`NeuroLensClient.download_artifact` (``.part`` file, sha256 while writing,
  fsync, rename), what ``neurolens download`` does;
- ``curl``: the same URL fetched by curl (when installed), a C client: what the server can send;
- ``upload``: :meth:`NeuroLensClient.upload_artifact` (sha256 of the file, one resumable
  session, the server hashing as the bytes arrive, then its checks: header and
  ``python -m trainer.validate``), end to end and split into its hash, send and verify parts;
- ``tuspy``: a stock tus 1.0 client (tuspy, 64 MiB chunks) sending the file to
  ``/api/tus``: all but the last byte (the transfer), then the last PATCH (which runs
  the same checks).

While the transfers run, a thread samples the server's RSS with psutil every 10 ms; the growth
over its RSS just before is printed, to show files are streamed, not held in memory.

    .venv/bin/python bench/download.py            # --preset large --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from clients import NeuroLensClient  # noqa: E402

MB = 1_000_000


def write_encoder_file(path: Path, preset: str) -> int:
    """Write a valid NeuroLens encoder file for ``preset`` tensor by tensor; return its size.

    The layout comes from the real module built on the meta device, so the server's checks
    (header, format, shapes from the declared config) pass exactly as for a trained encoder.
    """
    import torch

    from trainer.artifact_format import ENCODER_FORMAT, encode_header
    from trainer.checkpoint import SAFETENSORS_DTYPES
    from trainer.config import EncoderConfig
    from trainer.models.multiview import MultiViewEncoder

    config = EncoderConfig.from_name(preset)
    with torch.device("meta"):
        state = MultiViewEncoder(config).state_dict()
    header = encode_header([(name, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for name, t in state.items()],
                           {"format": ENCODER_FORMAT, "encoder_config": json.dumps(config.to_dict())})
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(header)
        for tensor in state.values():
            remaining = tensor.numel() * tensor.element_size()
            while remaining:
                n = min(remaining, 64 * MB)
                fh.write(rng.standard_normal(n // 4, dtype=np.float32).tobytes() if tensor.dtype == torch.float32
                         else bytes(n))
                remaining -= n
    return path.stat().st_size


class RssSampler:
    """Peak RSS of a process, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def start_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NEUROLENS_DATA_DIR": str(data_dir)}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not start")


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def upload_ours(client: NeuroLensClient, source: Path, name: str) -> dict[str, float]:
    """What ``upload_artifact`` does, timed part by part: hash, send (one PATCH), verify."""
    size = source.stat().st_size
    started = time.perf_counter()
    digest = sha256_file(source)
    hashed = time.perf_counter()
    session = client.open_upload("encoder", digest, size, name, reuse=False)

    def chunks():
        with open(source, "rb") as fh:
            while chunk := fh.read(4 << 20):
                yield chunk

    client.send_upload_bytes(session["id"], 0, size, chunks())
    sent = time.perf_counter()
    client.complete_upload(session["id"])
    done = time.perf_counter()
    return {"hash": hashed - started, "send": sent - hashed, "verify": done - sent, "total": done - started}


def upload_tuspy(url: str, source: Path, digest: str, name: str) -> dict[str, float] | None:
    """A stock tus client: every byte but the last (the transfer), then the last (the checks)."""
    try:
        from tusclient.client import TusClient
    except ImportError:
        return None
    size = source.stat().st_size
    uploader = TusClient(f"{url}/api/tus").uploader(
        str(source), chunk_size=64 << 20, metadata={"kind": "encoder", "sha256": digest, "filename": name})
    started = time.perf_counter()
    uploader.upload(stop_at=size - 1)
    sent = time.perf_counter()
    uploader.upload()
    done = time.perf_counter()
    return {"send": sent - started, "verify": done - sent, "total": done - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large", help="encoder preset whose file to move (large: ~1 GB)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (median reported)")
    args = parser.parse_args(argv)

    curl = shutil.which("curl")
    times: dict[str, list[float]] = {key: [] for key in (
        "copy", "copy + sha256", "download", "curl", "upload", "upload hash", "upload send", "upload verify",
        "tuspy", "tuspy send", "tuspy verify")}
    with tempfile.TemporaryDirectory(prefix="neurolens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "encoder.safetensors"
        size = write_encoder_file(source, args.preset)
        digest = sha256_file(source)
        process, url = start_server(tmp / "data", tmp / "server.log")
        try:
            with NeuroLensClient(url) as client:
                rss_before = psutil.Process(process.pid).memory_info().rss
                with RssSampler(process.pid) as rss:
                    for run in range(args.runs):
                        parts = upload_ours(client, source, f"ours-{run}.safetensors")
                        for key in ("hash", "send", "verify"):
                            times[f"upload {key}"].append(parts[key])
                        times["upload"].append(parts["total"])
                        tus = upload_tuspy(url, source, digest, f"tus-{run}.safetensors")
                        if tus is not None:
                            times["tuspy send"].append(tus["send"])
                            times["tuspy verify"].append(tus["verify"])
                            times["tuspy"].append(tus["total"])
                    artifact = client.list_artifacts(kind="encoder")[0]
                    stored = tmp / "data" / "artifacts" / str(artifact["id"]) / artifact["filename"]
                    download_url = f"{url}/api/artifacts/{artifact['id']}/download"
                    for _ in range(args.runs):  # interleaved, so that a busy moment hits each alike
                        times["copy"].append(timed(lambda: shutil.copyfile(stored, tmp / "copy")))
                        (tmp / "copy").unlink()
                        times["copy + sha256"].append(timed(lambda: (shutil.copyfile(stored, tmp / "copy"),
                                                                     sha256_file(tmp / "copy"))))
                        (tmp / "copy").unlink()
                        times["download"].append(timed(lambda: client.download_artifact(artifact["id"],
                                                                                        tmp / "verified")))
                        (tmp / "verified").unlink()
                        if curl:  # a C client: what the server itself can send
                            times["curl"].append(timed(lambda: subprocess.run(
                                [curl, "-sSf", "-o", str(tmp / "curl"), download_url], check=True)))
                            (tmp / "curl").unlink()
        finally:
            process.terminate()
            process.wait(30)

    def rate(key: str) -> float:
        return size / statistics.median(times[key]) / MB

    ceiling = rate("copy")
    print(f"artifact: {args.preset} encoder, {size / MB:.0f} MB, sha256 {digest[:16]}...; median of {args.runs} runs "
          f"each; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = [
        ("copy", "plain file copy (ceiling)"),
        ("copy + sha256", "file copy + sha256 of it"),
        ("download", "download + sha256 verify (client, CLI)"),
        ("curl", "curl download to file"),
        ("upload send", "upload: the bytes (server hashes them)"),
        ("upload", "upload end to end (hash, send, verify)"),
        ("tuspy send", "tuspy upload: the bytes"),
        ("tuspy", "tuspy upload end to end (with verify)"),
    ]
    for key, label in rows:
        if times[key]:
            print(f"{label:42s} {rate(key):8.1f} MB/s   {rate(key) / ceiling:.2f}x of the copy")
    print(f"upload parts (s): hash {statistics.median(times['upload hash']):.2f}, send "
          f"{statistics.median(times['upload send']):.2f}, verify {statistics.median(times['upload verify']):.2f}"
          + (f"; tuspy verify {statistics.median(times['tuspy verify']):.2f}" if times["tuspy verify"] else ""))
    print(f"upload bytes / download: {rate('upload send') / rate('download'):.2f}x; "
          f"upload end to end / download: {rate('upload') / rate('download'):.2f}x")
    transfers = len(times["download"]) + len(times["curl"]) + len(times["upload"]) + len(times["tuspy"])
    print(f"server RSS: {rss_before / MB:.0f} MB before, {rss.peak / MB:.0f} MB peak during "
          f"{transfers} transfers, growth {(rss.peak - rss_before) / MB:+.1f} MB "
          f"({(rss.peak - rss_before) / size * 100:.2f}% of the file size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
