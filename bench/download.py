"""Download benchmark: a ~1 GB encoder artifact over loopback, against a plain file copy.

Starts a real server (``python -m server`` on a free loopback port, temporary data directory),
writes a valid full-size encoder file (the ``large`` preset, about 270M float32 parameters,
random weights, streamed to disk so this script stays small too), imports it with the client's
resumable upload (the server verifies sha256, header and tensor shapes), then measures, each
``--runs`` times, median reported:

- ``copy``: ``shutil.copyfile`` of the stored artifact file, the ceiling for moving those bytes;
- ``http``: ``GET /api/artifacts/{id}/download`` streamed into a file with httpx;
- ``http+verify``: :meth:`NeuroLensClient.download_artifact` (``.part`` file, sha256, rename),
  what ``neurolens download`` does;
- ``curl``: the same URL fetched by curl (when installed), a C client, to separate what the
  server sends from what a Python client can take in.

While the upload and the downloads run, a thread samples the server's RSS with psutil every 10 ms; the growth
over its RSS just before is printed, to show the file is streamed, not held in memory.

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


def http_download(url: str, dest: Path) -> None:
    with httpx.Client(timeout=httpx.Timeout(60.0)) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in response.iter_raw(1 << 20):
                out.write(chunk)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large", help="encoder preset whose file to move (large: ~1 GB)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (median reported)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="neurolens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "encoder.safetensors"
        size = write_encoder_file(source, args.preset)
        process, url = start_server(tmp / "data", tmp / "server.log")
        try:
            with NeuroLensClient(url) as client:
                rss_before_upload = psutil.Process(process.pid).memory_info().rss
                with RssSampler(process.pid) as upload_rss:
                    started = time.perf_counter()
                    artifact = client.upload_artifact(source, "encoder")
                    upload_s = time.perf_counter() - started
                source.unlink()  # the stored copy is the one to read from now
                stored = tmp / "data" / "artifacts" / str(artifact["id"]) / artifact["filename"]
                download_url = f"{url}/api/artifacts/{artifact['id']}/download"
                copy_s, http_s, verified_s, curl_s = [], [], [], []
                curl = shutil.which("curl")
                rss_before = psutil.Process(process.pid).memory_info().rss
                with RssSampler(process.pid) as rss:
                    for _ in range(args.runs):
                        copy_s.append(timed(lambda: shutil.copyfile(stored, tmp / "copy")))
                        (tmp / "copy").unlink()
                        http_s.append(timed(lambda: http_download(download_url, tmp / "http")))
                        (tmp / "http").unlink()
                        verified_s.append(timed(lambda: client.download_artifact(artifact["id"], tmp / "verified")))
                        (tmp / "verified").unlink()
                        if curl:  # a C client: what the server itself can send
                            curl_s.append(timed(lambda: subprocess.run(
                                [curl, "-sSf", "-o", str(tmp / "curl"), download_url], check=True)))
                            (tmp / "curl").unlink()
        finally:
            process.terminate()
            process.wait(30)

    def rate(seconds: list[float]) -> float:
        return size / statistics.median(seconds) / MB

    ceiling = rate(copy_s)
    print(f"artifact: {args.preset} encoder, {size / MB:.0f} MB, sha256 {artifact['sha256'][:16]}...; "
          f"median of {args.runs} runs each")
    print(f"upload (resumable, verified by the server): {size / upload_s / MB:8.1f} MB/s   "
          f"(client and server each hash the file; server RSS growth "
          f"{(upload_rss.peak - rss_before_upload) / MB:+.1f} MB)")
    print(f"plain file copy (ceiling):                  {ceiling:8.1f} MB/s")
    print(f"HTTP download to file:                      {rate(http_s):8.1f} MB/s   "
          f"{rate(http_s) / ceiling:.2f}x of the copy")
    print(f"HTTP download + sha256 verify (client):     {rate(verified_s):8.1f} MB/s   "
          f"{rate(verified_s) / ceiling:.2f}x of the copy")
    if curl_s:
        print(f"curl download to file:                      {rate(curl_s):8.1f} MB/s   "
              f"{rate(curl_s) / ceiling:.2f}x of the copy")
    transfers = (4 if curl_s else 3) * args.runs
    print(f"server RSS: {rss_before / MB:.0f} MB before, {rss.peak / MB:.0f} MB peak during "
          f"{transfers} downloads, growth {(rss.peak - rss_before) / MB:+.1f} MB "
          f"({(rss.peak - rss_before) / size * 100:.2f}% of the file size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
