"""Datasets are checked before a job is queued (finding 7), and confined to the dataset roots.

Real files written with MNE, a real server, the real ``python -m trainer.check_dataset``
subprocess: each bad recording is a 422 naming the file, the channels it has and the ones the
preset needs; nothing is queued.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mne
import numpy as np
import pytest

from tests.conftest import REPO_ROOT, free_port, start_server
from trainer.config import CHANNELS_8

TINY = {"preset": "tiny", "steps": 3, "log_every_s": 0.5}


def write_recording(path, names, kind="eeg"):
    info = mne.create_info(list(names), sfreq=128.0, ch_types=kind)
    raw = mne.io.RawArray(np.random.default_rng(0).normal(0, 1e-5, (len(names), 128 * 4)), info, verbose="error")
    if path.suffix == ".edf":
        mne.export.export_raw(path, raw, fmt="edf", overwrite=True, verbose="error")
    else:
        raw.save(path, overwrite=True, verbose="error")
    return path


def submit(server, dataset) -> tuple[int, str]:
    with server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(dataset), "config": TINY})
        if response.status_code == 201:
            client.post(f"/api/jobs/{response.json()['id']}/cancel")
        return response.status_code, response.json().get("detail", "")


def assert_nothing_queued(server):
    with server.client() as client:
        assert client.get("/api/jobs", params={"status": "queued"}).json()["count"] == 0


def test_bad_recordings_are_refused_at_submission_naming_file_and_channels(shared_server, tmp_path):
    text = tmp_path / "notes.edf"
    text.write_text("these are my notes, not a recording\n" * 50)
    status, detail = submit(shared_server, text)
    assert status == 422 and f"Cannot read {text}" in detail

    misc = write_recording(tmp_path / "misc.fif", ["misc1", "misc2", "misc3"], kind="misc")
    status, detail = submit(shared_server, misc)
    assert status == 422
    assert f"Recording {misc} has no EEG channels (found: misc1 (misc), misc2 (misc), misc3 (misc))" in detail
    assert "at least 4 are needed (F3, Fz, F4, C3, Cz, C4, P3, Pz)" in detail

    # A signal-generator EDF: its channels are read as EEG but none is an electrode the preset knows.
    generator = write_recording(tmp_path / "generator.edf", ["squarewave", "ramp", "pulse", "noise"])
    status, detail = submit(shared_server, generator)
    assert status == 422
    assert f"Recording {generator} has 0 of the encoder's 8 channels" in detail
    assert "its EEG channels: squarewave, ramp, pulse, noise" in detail and "(F3, Fz, F4" in detail

    partial = write_recording(tmp_path / "partial.fif", ["Fz", "Cz", "O1", "O2", "T7"])
    status, detail = submit(shared_server, partial)
    assert status == 422 and "has 2 of the encoder's 8 channels; at least 4 are needed" in detail

    # In a folder, one bad file among good ones is named.
    folder = tmp_path / "study"
    folder.mkdir()
    write_recording(folder / "sub-01.fif", CHANNELS_8)
    write_recording(folder / "sub-02.fif", ["misc1"], kind="misc")
    status, detail = submit(shared_server, folder)
    assert status == 422 and f"Recording {folder / 'sub-02.fif'} has no EEG channels" in detail
    assert_nothing_queued(shared_server)


def test_a_good_recording_passes_the_check(shared_server, tmp_path):
    good = write_recording(tmp_path / "good.edf", [f"EEG {name}-REF" for name in CHANNELS_8])
    status, detail = submit(shared_server, good)
    assert status == 201, detail


@pytest.fixture
def confined(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    write_recording(allowed / "good.fif", CHANNELS_8)
    write_recording(outside / "secret.fif", CHANNELS_8)
    (allowed / "escape").symlink_to(outside)
    server = start_server(tmp_path / "data", env={"NEUROLENS_DATASET_ROOTS": f"{tmp_path / 'nowhere'}{os.pathsep}{allowed}"})
    try:
        yield server, allowed, outside
    finally:
        server.stop()


def test_dataset_roots_confine_paths_and_tell_nothing_about_others(confined):
    server, allowed, outside = confined
    status, detail = submit(server, allowed / "good.fif")
    assert status == 201, detail
    refusals = {}
    for path in (outside / "secret.fif", outside / "missing.fif", allowed / "escape" / "secret.fif",
                 allowed / ".." / "outside" / "secret.fif", "/etc/passwd"):
        status, detail = submit(server, path)
        assert status == 422 and "is not inside the server's dataset roots" in detail
        refusals[str(path)] = detail.replace(repr(str(path)), "PATH")
    # One answer whether the file exists or not: no existence oracle.
    assert len(set(refusals.values())) == 1, refusals
    assert str(allowed) in detail and "NEUROLENS_DATASET_ROOTS" in detail
    # Inside the roots, a missing path may be named missing.
    status, detail = submit(server, allowed / "missing.fif")
    assert status == 422 and "does not exist" in detail


def test_beyond_loopback_dataset_roots_are_required(tmp_path):
    env = {**os.environ, "NEUROLENS_TOKEN": "a-token", "NEUROLENS_DATASET_ROOTS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "Refusing to listen on '0.0.0.0' without dataset roots: set NEUROLENS_DATASET_ROOTS" in result.stderr
    assert not (tmp_path / "neurolens.db").exists()
