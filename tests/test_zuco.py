"""ZuCo's results files, both versions: the layout as written, the fields as read, training end to end.

Files are written by :mod:`trainer.data.zuco_writer` (v5 through scipy, v7.3 through h5py the
way MATLAB writes it) with the synthetic generator's word responses and the traps real files
carry; each test reads them back with the real reader, the real preprocessing, the real
``python -m trainer.check_dataset`` or a real server and trainer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from tests.conftest import REPO_ROOT, start_server
from trainer.config import CHANNELS_32, EncoderConfig, Stage1Config
from trainer.data import zuco
from trainer.data.recordings import load_recording, open_recording, resolve_dataset
from trainer.data.synthetic import generate_raw
from trainer.data.zuco_writer import LEAD_S, _traps, write_task
from trainer.exceptions import RecordingError

N = 20
SEED = 3
SR = "zuco1/task1- SR/Matlab files"
NR = "zuco2/task1 - NR/Matlab files"


@pytest.fixture(scope="module")
def zuco_root(tmp_path_factory) -> Path:
    """A ZuCo folder as distributed: ZuCo 1.0's SR task (v5, two subjects), ZuCo 2.0's NR (v7.3, one)."""
    root = tmp_path_factory.mktemp("zuco")
    write_task(root / SR, "SR", "5", ("ZAB", "ZDM"), SEED, False, N)
    write_task(root / NR, "NR", "7.3", ("YAC",), SEED, False, N, first=N)
    return root


def truth(first: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """The generator's sentences ``first .. first + N - 1``: text and word onsets from the
    sentence's first ``rawData`` sample (which starts LEAD_S before the first word)."""
    ann = generate_raw(CHANNELS_32, SEED, n_sentences=first + N, sfreq=zuco.SFREQ).annotations
    sentences = [(o, d, t[len("sentence:"):]) for o, d, t in zip(ann.onset, ann.duration, ann.description)
                 if t.startswith("sentence:")][first:]
    words = [(o, t[len("word:"):]) for o, t in zip(ann.onset, ann.description) if t.startswith("word:")]
    return [(text, [(w, o - onset + LEAD_S) for o, w in words if onset - 1e-6 <= o < onset + duration])
            for onset, duration, text in sentences]


def test_both_versions_are_written_in_matlab_s_layout(zuco_root):
    # v5: what scipy (and MATLAB) read back is a 1 x N struct array with ZuCo's fields.
    mat = scipy.io.loadmat(zuco_root / SR / "resultsZAB_SR.mat", squeeze_me=True, struct_as_record=False)
    sentences = mat["sentenceData"]
    assert len(sentences) == N and {"content", "rawData", "word", "allFixations"} <= set(sentences[0]._fieldnames)
    assert sentences[0].rawData.shape[0] == 105 and not sentences[0].rawData[-1].any()  # the reference row
    assert sentences[8].rawData.size == 0 and np.size(sentences[8].word) == 0  # the missing recording

    # v7.3: an HDF5 file behind MATLAB's 512-byte header; struct fields as references into #refs#.
    path = zuco_root / NR / "resultsYAC_NR.mat"
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file" and h5py.is_hdf5(path)
    with h5py.File(path, "r") as f:
        group = f["sentenceData"]
        assert group.attrs["MATLAB_class"] == b"struct" and "#refs#" in f
        assert group["content"].dtype == h5py.ref_dtype and group["content"].shape == (N, 1)
        text = f[group["content"][0, 0]]
        assert text.dtype == np.uint16 and text.attrs["MATLAB_class"] == b"char"
        assert f[group["rawData"][0, 0]].shape[1] == 105  # MATLAB's 105 x T, stored transposed
        words = f[group["word"][3, 0]]  # sentence 3 has a word never fixated: nFixations = []
        empty = f[words["nFixations"][1, 0]]
        assert empty.attrs["MATLAB_empty"] == 1 and empty.dtype == np.uint64


@pytest.mark.parametrize("folder, name, first", [(SR, "resultsZAB_SR.mat", 0), (NR, "resultsYAC_NR.mat", N)])
def test_both_versions_read_with_fixation_onsets_nan_stretches_and_empty_fixations(zuco_root, folder, name, first):
    path = zuco_root / folder / name
    expected = truth(first)
    read = list(zuco.iter_sentences(path))
    assert [s.text for s in read] == [text for text, _ in expected]
    for i, (sentence, (_, words)) in enumerate(zip(read, expected)):
        traps = _traps(i, N)
        if "missing" in traps:
            assert sentence.data is None and sentence.words == []
            continue
        assert [w for w, _ in sentence.words] == [w for w, _ in words]
        for j, ((_, onset), (_, true_onset)) in enumerate(zip(sentence.words, words)):
            if "skipped_word" in traps and j == 1:
                assert onset is None  # nFixations = []: no onset
            else:  # the first fixation, also for a word fixated again later (a regression)
                assert onset == pytest.approx(true_onset, abs=1e-6)
        if "failed" in traps:
            assert np.isnan(sentence.data).all()
        elif "short_nan" in traps:
            assert 0 < np.isnan(sentence.data).any(axis=0).mean() <= zuco.MAX_NAN_SHARE

    recording = zuco.read_zuco(path)
    assert (recording.subject, recording.n_sentences) == (name[7:10], N)
    assert recording.skipped == {"no_eeg": 2, "nan": 1, "words_no_fixation": 3}
    raw = recording.raw
    assert raw.info["sfreq"] == 500.0 and raw.ch_names == list(zuco.CHANNELS) and raw.info["bads"] == ["Cz"]
    assert np.isfinite(raw.get_data()).all()  # NaN stretches filled, never passed on
    assert raw.get_montage() is not None
    texts = [d for d in raw.annotations.description if d.startswith("sentence:")]
    assert len(texts) == N - 3  # failed, missing, over the NaN limit
    n_words = sum(len(w) for i, (_, w) in enumerate(expected) if not {"failed", "missing", "long_nan"} & _traps(i, N))
    assert sum(d.startswith("word:") for d in raw.annotations.description) == n_words - 3


def test_a_zuco_file_is_preprocessed_onto_a_preset_by_electrode_position(zuco_root):
    rec = load_recording(zuco_root / NR / "resultsYAC_NR.mat", EncoderConfig.from_name("tiny"))
    assert rec.present.all() and np.isfinite(rec.data).all() and rec.subject == "YAC"
    assert len(rec.sentences) == N - 3 and rec.sentences[0].onset_s == 0.0
    channels = rec.notes["channels"]
    assert list(channels) == list(EncoderConfig.from_name("tiny").channels)
    assert all(how.startswith("interpolated from 104 electrodes") for how in channels.values()), channels
    assert "nearest E" in channels["Cz"] and rec.notes["skipped"]["words_no_fixation"] == 3
    # The word responses survive the net and the spline: signal is not flat or constant.
    assert 0.5 < float(np.median(rec.data.std(axis=1))) < 5


def test_an_encoder_on_zucos_own_channels_reads_them_by_name(zuco_root):
    config = Stage1Config(preset="tiny", channels=[ch for ch in zuco.CHANNELS if ch != zuco.REFERENCE])
    opened = open_recording(zuco_root / SR / "resultsZDM_SR.mat", config.encoder)
    assert opened.channel_map.method == "name" and opened.channel_map.n_found == 104 and opened.subject == "ZDM"
    assert opened.channel_map.describe()["E11"] == "by name (E11)"


def test_a_dataset_may_be_one_file_a_task_folder_or_the_whole_zuco_folder(zuco_root):
    encoder = EncoderConfig.from_name("tiny")
    one = zuco_root / SR / "resultsZAB_SR.mat"
    (zuco_root / SR / "wordbounds_notes.mat").write_bytes(b"not a results file")  # ignored by name
    assert resolve_dataset(str(one), zuco_root, encoder) == [one]
    assert [p.name for p in resolve_dataset(str(zuco_root / "zuco1" / "task1- SR"), zuco_root, encoder)] == \
        ["resultsZAB_SR.mat", "resultsZDM_SR.mat"]
    assert len(resolve_dataset(str(zuco_root), zuco_root, encoder)) == 3


def check(dataset: str, channels: tuple[str, ...]) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "trainer.check_dataset",
                             json.dumps({"dataset": dataset, "channels": list(channels)})],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_submission_check_says_what_it_found_in_a_zuco_folder(zuco_root, tmp_path):
    code, found = check(str(zuco_root), EncoderConfig.from_name("tiny").channels)
    assert code == 0, found
    assert found["layout"] == "zuco" and found["recordings"] == 3
    assert found["subjects"] == ["YAC", "ZAB", "ZDM"] and found["tasks"] == ["NR", "SR"]
    # v5 files are not parsed at submission (real ones are large): their EEG is not counted here.
    assert found["sentences"] == 3 * N and found["sentences_without_eeg"] is None
    assert found["mapping"] == "8 of 8 channels by position (from 104 electrodes)"
    assert found["mappings"] == {found["mapping"]: 3}
    assert found["channels"]["Fz"].startswith("interpolated from 104 electrodes (E11")
    code, found = check(str(zuco_root / "zuco2"), EncoderConfig.from_name("tiny").channels)
    assert (code, found["subjects"], found["sentences"], found["sentences_without_eeg"]) == (0, ["YAC"], N, 1)

    # A damaged results file is refused with its name, not a traceback.
    broken = tmp_path / "resultsXYZ_SR.mat"
    broken.write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    code, found = check(str(broken), EncoderConfig.from_name("tiny").channels)
    assert code == 2 and str(broken) in found["error"], found
    with pytest.raises(RecordingError, match="resultsXYZ_SR.mat"):
        zuco.read_zuco(broken)


def test_a_results_file_without_usable_eeg_or_with_other_rows_is_refused_by_name(tmp_path):
    from trainer.data.zuco_writer import write_v73

    empty = tmp_path / "resultsNUL_NR.mat"
    write_v73(empty, [{"content": "a dog runs", "rawData": None, "word": [], "allFixations": None},
                      {"content": "a car waits", "rawData": np.full((105, 500), np.nan, np.float32),
                       "word": [], "allFixations": None}])
    with pytest.raises(RecordingError, match=r"resultsNUL_NR.mat: none of its 2 sentences has usable EEG "
                                             r"\(2 sentences without EEG\)"):
        zuco.read_zuco(empty)
    rows = tmp_path / "resultsROW_NR.mat"
    write_v73(rows, [{"content": "a dog runs", "rawData": np.zeros((64, 500), np.float32), "word": [],
                      "allFixations": None}])
    code, found = check(str(rows), EncoderConfig.from_name("tiny").channels)
    assert code == 2 and "resultsROW_NR.mat: rawData has 64 EEG rows; ZuCo files have 105" in found["error"], found


# -- end to end through a real server: both versions in one dataset (synthetic:zuco) ----------------------

STAGE1 = {"preset": "tiny", "steps": 30, "batch_size": 8, "probe_words": 0, "val_windows": 16, "log_every_s": 5.0}
STAGE2 = {"preset": "tiny", "steps": 600, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "checkpoint_every": 600,
          "log_every_s": 5.0, "max_target_tokens": 16}


@pytest.fixture(scope="module")
def zuco_server(tmp_path_factory):
    # One thread per trainer: on a shared 2-core machine that is faster and gives the same numbers.
    running = start_server(tmp_path_factory.mktemp("zuco-server") / "data", env={"OMP_NUM_THREADS": "1"})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def zuco_stage1(zuco_server):
    with zuco_server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": "synthetic:zuco", "config": STAGE1})
        assert response.status_code == 201, response.text
        job = zuco_server.wait_for_job(response.json()["id"], {"succeeded", "failed"}, timeout=600)
        assert job["status"] == "succeeded", job["error"]
        events = client.get(f"/api/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    return job, events


def interval(job: dict) -> tuple[float, float]:
    m = job["metrics"]
    print(f"\nBLEU-1 eeg {m['test_bleu1_eeg']:.3f} noise {m['test_bleu1_noise']:.3f}; eeg - noise 95% "
          f"[{m['test_bleu1_eeg_minus_noise_ci_low']:+.3f}, {m['test_bleu1_eeg_minus_noise_ci_high']:+.3f}]")
    return m["test_bleu1_eeg_minus_noise_ci_low"], m["test_bleu1_eeg_minus_noise_ci_high"]


@pytest.mark.slow
@pytest.mark.ci
def test_stage1_and_stage2_train_on_both_zuco_versions_through_the_server(zuco_server, zuco_stage1):
    job, events = zuco_stage1
    read = [e for e in events if e["kind"] == "log" and "recording" in (e["metrics"] or {})]
    # One event per subject file, v5 and v7.3 alike, saying how each preset channel was made.
    assert sorted(e["metrics"]["subject"] for e in read) == ["YAC", "YAG", "ZAB", "ZDM"]
    for event in read:
        assert set(event["metrics"]["channels"]) == set(EncoderConfig.from_name("tiny").channels)
        assert all(how.startswith("interpolated") for how in event["metrics"]["channels"].values())
        assert event["metrics"]["skipped"] == {"no_eeg": 2, "nan": 1, "words_no_fixation": 23}
        assert "by position" in event["message"] and "skipped 2 sentences without EEG" in event["message"]

    with zuco_server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage2", "dataset": "synthetic:zuco", "config": STAGE2,
                                                  "after": job["id"]})
        assert response.status_code == 201, response.text
    stage2 = zuco_server.wait_for_job(response.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert stage2["status"] == "succeeded", stage2["error"]
    low, high = interval(stage2)
    assert low > 0, stage2["metrics"]


@pytest.mark.slow
@pytest.mark.ci
def test_on_synthetic_zuco_null_the_interval_contains_zero(zuco_server, zuco_stage1):
    job, _ = zuco_stage1
    with zuco_server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage2", "dataset": "synthetic:zuco-null",
                                                  "config": STAGE2, "after": job["id"]})
        assert response.status_code == 201, response.text
    stage2 = zuco_server.wait_for_job(response.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert stage2["status"] == "succeeded", stage2["error"]
    low, high = interval(stage2)
    assert low <= 0 <= high, stage2["metrics"]
