"""The wheel a notebook machine installs carries everything: built from the checkout, installed
in a new venv outside it, it serves, takes an uploaded encoder, trains Stage 2 and hands back a
model that loads with the loader inside it: the README's "On a notebook machine" cells.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port


def run(command: list, *, cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def source_copy(target: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored), copied: the build leaves
    nothing in the checkout and sees nothing a clean clone would not have."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def tiny_encoder(path: Path) -> Path:
    """An encoder file as the trainer exports it (random weights: Stage 2 trains on any)."""
    from trainer.config import EncoderConfig
    from trainer.export import save_encoder
    from trainer.models.multiview import MultiViewEncoder

    return save_encoder(MultiViewEncoder(EncoderConfig.from_name("tiny")), path)


@pytest.mark.slow
@pytest.mark.ci  # the done-when test for the notebook machine: a build, a venv, a short job
def test_the_wheel_alone_serves_and_trains_stage2_from_an_uploaded_encoder(tmp_path):
    import httpx

    source = source_copy(tmp_path / "source")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", source], cwd=tmp_path,
        env=dict(os.environ))
    (wheel,) = (tmp_path / "dist").glob("neurolens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = {p.name for p in (REPO_ROOT / "migrations" / "versions").glob("*.py")}
    assert {f"migrations/versions/{v}" for v in versions} <= names
    assert {"clients/dashboard/index.html", "clients/dashboard/app.js", "clients/dashboard/style.css",
            "trainer/standalone.py", "migrations/env.py", "migrations/script.py.mako"} <= names

    # A venv outside the checkout, with nothing of it on the path: only the wheel can serve.
    home = tmp_path / "notebook"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEUROLENS_", "PYTHON", "VIRTUAL_ENV"))}
    run([sys.executable, "-m", "venv", home / "venv"], cwd=home, env=env)
    bin_dir = home / "venv" / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    pip = [bin_dir / "python", "-m", "pip", "install", "--quiet"]
    run([*pip, "torch==2.13.0"], cwd=home, env=env)  # first, so the CPU build is the one taken
    run([*pip, wheel], cwd=home, env=env)
    where = run([bin_dir / "python", "-c", "import server, trainer; print(server.__file__, trainer.__file__)"],
                cwd=home, env=env)
    assert str(REPO_ROOT) not in where and "site-packages" in where

    encoder = tiny_encoder(home / "encoder.safetensors")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env["NEUROLENS_SERVER"] = url
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([bin_dir / "neurolens", "serve", "--port", str(port), "--data-dir", home / "data"],
                              cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "NeuroLens" in httpx.get(url, timeout=10).text  # the dashboard's files came along

        sha256 = hashlib.sha256(encoder.read_bytes()).hexdigest()
        encoder_id = run(["neurolens", "upload", encoder, "--kind", "encoder", "--sha256", sha256, "-q"],
                         cwd=home, env=env).strip()
        job_id = run(["neurolens", "submit", "stage2", "--encoder-artifact", encoder_id, "--preset", "tiny",
                      "--steps", "4", "--set", "checkpoint_every=4", "--set", "log_every_s=0.5", "-q"],
                     cwd=home, env=env).strip()
        deadline = time.monotonic() + 600
        while (job := httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(1)
        trainer_log = home / "data" / "jobs" / job_id / "trainer.log"
        assert job["status"] == "succeeded", f"{job}\n{trainer_log.read_text()[-3000:]}"
        # The trainer ran from the venv, not from the checkout.
        assert str(REPO_ROOT) not in (home / "data" / "jobs" / job_id / "spec.json").read_text()

        (model,) = [a for a in job["artifacts"] if a["kind"] == "model"]
        run(["neurolens", "download", str(model["id"]), "-o", home / "model.safetensors"], cwd=home, env=env)
        check = ("from safetensors import safe_open\n"
                 "with safe_open('model.safetensors', 'pt') as f:\n"
                 "    open('neurolens_loader.py', 'w').write(f.metadata()['loader'])\n"
                 "import neurolens_loader\n"
                 "model = neurolens_loader.load('model.safetensors')\n"
                 "print(len(model.channels), model.window_samples)\n")
        channels, samples = run([bin_dir / "python", "-c", check], cwd=home, env=env).split()
        assert int(channels) > 0 and int(samples) > 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
