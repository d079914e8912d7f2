"""BIDS datasets through mne-bids, and splits that hold out sentences or subjects.

Every dataset here is written by mne-bids' own ``write_raw_bids`` (through the synthetic
generator's :func:`write_bids_recording`), so the reader meets the layout real datasets have:
sessions, ``channels.tsv`` with a bad channel, ``electrodes.tsv``, ``participants.tsv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_server
from trainer.check_dataset import check
from trainer.config import CHANNELS_8, ConfigError, EncoderConfig
from trainer.data import bids
from trainer.data.recordings import load_recording, open_recording, resolve_dataset
from trainer.data.synthetic import generate_raw, write_bids_recording
from trainer.data.text import split_by_text, split_sentences
from trainer.exceptions import DatasetError, RecordingError
from trainer.stages import parse_config

TINY = EncoderConfig.from_name("tiny")
N_SENTENCES = 8


def write_dataset(root: Path, plan: dict[tuple[str, str | None], int], bad: dict[tuple[str, str | None], str] = {},
                  n_sentences: int = N_SENTENCES) -> Path:
    """A BIDS dataset: one recording per (subject, session) of ``plan``, whose value is the
    generator seed of the sentences read (equal seeds: the same sentences, as in ZuCo), each
    with its own background noise; ``bad`` marks a channel bad in one recording."""
    for k, ((subject, session), seed) in enumerate(sorted(plan.items(), key=str)):
        raw = generate_raw(CHANNELS_8, seed, n_sentences=n_sentences)
        raw._data += np.random.default_rng(100 + k).normal(0, 5e-6, raw._data.shape)  # another brain, same text
        if (subject, session) in bad:
            raw.info["bads"] = [bad[(subject, session)]]
        write_bids_recording(raw, root, subject, session)
    return root


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory) -> Path:
    """Two subjects, two sessions each, everyone reading the same sentences; Cz bad in sub-01 ses-2."""
    root = tmp_path_factory.mktemp("bids") / "study"
    return write_dataset(root, {(s, ses): 3 for s in ("01", "02") for ses in ("1", "2")}, bad={("01", "2"): "Cz"})


def test_a_dataset_written_by_mne_bids_reads_as_such(two_by_two):
    paths = resolve_dataset(str(two_by_two), two_by_two, TINY)
    assert [p.relative_to(two_by_two).as_posix() for p in paths] == [
        f"sub-{s}/ses-{ses}/eeg/sub-{s}_ses-{ses}_task-reading_eeg.edf" for s in ("01", "02") for ses in ("1", "2")]
    recordings = [load_recording(p, TINY) for p in paths]
    assert [r.subject for r in recordings] == ["01", "01", "02", "02"]

    cz = CHANNELS_8.index("Cz")
    opened = open_recording(paths[1], TINY)
    raw, eeg_names = opened.raw, opened.eeg_names
    assert raw.info["bads"] == ["Cz"] and "Cz" not in eeg_names  # channels.tsv's status honoured
    assert not recordings[1].present[cz] and not recordings[1].data[cz].any()  # left out: masked, zero
    assert all(r.present.all() for i, r in enumerate(recordings) if i != 1)

    # electrodes.tsv (CapTrak, with its coordsystem.json) reaches the raw as its montage.
    positions = raw.get_montage().get_positions()["ch_pos"]
    assert set(positions) == set(CHANNELS_8) and np.isfinite(positions["Fz"]).all()

    # events.tsv: trial_type sentence / word, the text in the extra 'text' column write_raw_bids wrote.
    header = (paths[0].parent / "sub-01_ses-1_task-reading_events.tsv").read_text().splitlines()[0].split("\t")
    assert {"trial_type", "value", "text"} <= set(header)
    reference = generate_raw(CHANNELS_8, 3, n_sentences=N_SENTENCES).annotations
    expected = [str(d).split(":", 1)[1] for d in reference.description if str(d).startswith("sentence:")]
    assert all([s.text for s in r.sentences] == expected for r in recordings)

    columns, rows = bids.read_participants(two_by_two)
    assert columns[0] == "participant_id" and sorted(rows) == ["01", "02"]


def test_the_check_says_what_a_bids_root_holds(two_by_two):
    found = check(str(two_by_two), list(CHANNELS_8))
    assert found["recordings"] == 4 and found["subjects"] == ["01", "02"]
    report = found["bids"]
    assert (report["subjects"], report["sessions"], report["tasks"], report["runs"]) == (
        ["01", "02"], ["1", "2"], ["reading"], [])
    assert report["bad_channels"] == {"sub-01_ses-2_task-reading_eeg.edf": ["Cz"]}
    assert report["participants"]["count"] == 2 and "age" in report["participants"]["columns"]
    assert "2 subjects (01, 02), 2 sessions (1, 2), 1 task (reading)" in found["summary"]
    assert "sub-01_ses-2_task-reading_eeg.edf: Cz" in found["summary"]
    assert report["participants"]["without_recordings"] == report["participants"]["not_listed"] == []
    with pytest.raises(DatasetError, match=r"Unknown split.test_subjects '03': not in the dataset; its subjects are "
                                           r"01, 02"):
        check(str(two_by_two), list(CHANNELS_8), ["02", "03"])


def test_participants_that_do_not_match_the_recordings_are_reported(tmp_path):
    root = write_dataset(tmp_path / "study", {("01", None): 3, ("02", None): 3}, n_sentences=2)
    table = (root / "participants.tsv").read_text().replace("sub-02", "sub-20")
    (root / "participants.tsv").write_text(table + "sub-30\tn/a\tn/a\tn/a\tn/a\tn/a\n")
    found = check(str(root), list(CHANNELS_8))
    assert found["bids"]["participants"]["without_recordings"] == ["20", "30"]
    assert found["bids"]["participants"]["not_listed"] == ["02"]
    assert "participants.tsv: 3 rows, columns age, sex, hand, weight, height, listing subjects without recordings: " \
           "20, 30, not listing subjects 02." in found["summary"]
    (root / "participants.tsv").write_text("subject\tage\n01\t30\n")
    with pytest.raises(DatasetError, match=r"participants.tsv has no participant_id column \(its columns: subject, "
                                           r"age\)"):
        check(str(root), list(CHANNELS_8))


def test_malformed_bids_roots_are_dataset_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    with pytest.raises(DatasetError, match="is a BIDS dataset .* but mne-bids found no EEG recording"):
        resolve_dataset(str(empty), tmp_path, TINY)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_description.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset_description.json is not valid JSON"):
        resolve_dataset(str(broken), tmp_path, TINY)

    root = write_dataset(tmp_path / "sidecar", {("01", None): 3}, n_sentences=2)
    [path] = resolve_dataset(str(root), tmp_path, TINY)
    channels = path.with_name("sub-01_task-reading_channels.tsv")
    good = channels.read_text()
    # mne-bids itself only warns about these two, and would then train on the channels meant bad.
    channels.write_text("this is\tnot a channels file\n")
    with pytest.raises(RecordingError, match=r"channels.tsv lacks the column\(s\) name, type, units"):
        open_recording(path, TINY)
    channels.write_text(good.replace("\tgood", "\tbroken", 1))
    with pytest.raises(RecordingError, match=r"channels.tsv line 2: status 'broken' for channel 'F3'; expected one "
                                             r"of good, bad, n/a"):
        open_recording(path, TINY)
    channels.write_text(good.replace("Fz\t", "Fzz\t"))  # mne-bids' own check: names must match the file's
    with pytest.raises(RecordingError, match=r"Cannot read BIDS recording .*sub-01_task-reading_eeg\.edf with its "
                                             r"sidecars: Channel mismatch"):
        open_recording(path, TINY)
    channels.write_text(good)
    events = path.with_name("sub-01_task-reading_events.tsv")
    events.write_text("onset\tduration\ttrial_type\nsoon\t1\tword\n")
    with pytest.raises(RecordingError, match=r"with its sidecars: could not convert string to float: 'soon'"):
        open_recording(path, TINY)


def test_the_same_sentence_falls_in_one_part_for_every_subject():
    pool = [f"sentence {i}" for i in range(60)]
    texts, subjects = [], []
    for k, subject in enumerate(("01", "02", "03", "04")):  # each reads most of the pool, in its own order
        read = [pool[(k * 7 + 11 * i) % 60] for i in range(50)]
        texts += read
        subjects += [subject] * len(read)
    parts, summary = split_sentences(texts, subjects)
    part_of: dict[str, set[str]] = {}
    for text, part in zip(texts, parts):
        part_of.setdefault(text, set()).add(part)
    assert all(len(p) == 1 for p in part_of.values())  # never one text in two parts, across subjects
    assert parts == split_by_text(texts) and summary["split"] == "text"
    assert all(summary[name]["subjects"] == ["01", "02", "03", "04"] for name in ("train", "val", "test"))
    assert sum(summary[name]["sentences"] for name in ("train", "val", "test")) == len(texts)


def test_held_out_subjects_are_exactly_the_test_part():
    texts = [f"shared {i}" for i in range(20)] * 3 + [f"own {i}" for i in range(20)]
    subjects = ["01"] * 20 + ["02"] * 20 + ["03"] * 20 + ["01"] * 20  # 01 also reads sentences nobody else does
    parts, summary = split_sentences(texts, subjects, ["03"])
    assert [p == "test" for p in parts] == [s == "03" for s in subjects]
    # text_disjoint (the default): the shared texts 03 read are trained on by nobody.
    assert {t for t, p in zip(texts, parts) if p in ("train", "val")} <= {f"own {i}" for i in range(20)}
    assert summary["excluded_sentences"] == 40 and summary["test_texts_seen_in_training"] == 0
    assert summary["test"] == {"sentences": 20, "texts": 20, "subjects": ["03"]}
    assert summary["train"]["subjects"] == ["01"]

    parts, summary = split_sentences(texts, subjects, ["03"], text_disjoint=False)
    assert [p == "test" for p in parts] == [s == "03" for s in subjects]
    assert "excluded" not in parts and summary["train"]["subjects"] == ["01", "02"]
    assert summary["test_texts_seen_in_training"] == len({t for t, p in zip(texts, parts) if p == "test"}
                                                         & {t for t, p in zip(texts, parts) if p == "train"}) > 0
    with pytest.raises(DatasetError, match=r"Unknown split.test_subjects '7': .* its subjects are 01, 02, 03"):
        split_sentences(texts, subjects, ["7"])


def test_split_config_is_checked():
    config = parse_config("stage2", {"split": {"test_subjects": ["sub-01", "02"]}})
    assert config.split == {"test_subjects": ["01", "02"], "text_disjoint": True}
    assert parse_config("stage1", {}).split == {} and parse_config("stage1", {}).test_subjects == []
    for split, message in [
        ([], "Invalid split []; expected an object"),
        ({"holdout": 1}, "Unknown split key 'holdout'; expected some of: test_subjects, text_disjoint"),
        ({"test_subjects": []}, "Invalid split.test_subjects []; expected a non-empty list"),
        ({"test_subjects": ["01", 2]}, "Invalid split.test_subjects"),
        ({"test_subjects": ["01", "sub-01"]}, "each subject may appear once"),
        ({"test_subjects": ["01_ses-1"]}, "Invalid split.test_subjects label '01_ses-1'; a subject label is 1 to 64"),
        ({"test_subjects": [str(i) for i in range(1001)]}, "1001 subjects; at most 1000"),
        ({"test_subjects": ["01"], "text_disjoint": "yes"}, "Invalid split.text_disjoint 'yes'; expected true or false"),
        ({"text_disjoint": False}, "text_disjoint applies to a split with test_subjects only"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config("stage2", {"split": split})


def test_submission_checks_subjects_and_roots_and_reports_what_it_found(two_by_two, tmp_path):
    broken = tmp_path / "broken"
    (broken / "sub-01" / "eeg").mkdir(parents=True)
    (broken / "dataset_description.json").write_text("[]")
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            response = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(two_by_two), "config": {
                "preset": "tiny", "steps": 2, "split": {"test_subjects": ["01", "09"]}}})
            assert response.status_code == 422, response.text
            assert "Unknown split.test_subjects '09': not in the dataset; its subjects are 01, 02" in \
                response.json()["detail"]
            response = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(broken),
                                                      "config": {"preset": "tiny", "steps": 2}})
            assert response.status_code == 422, response.text
            assert "dataset_description.json holds list; expected a JSON object" in response.json()["detail"]
            assert client.get("/api/jobs").json()["count"] == 0  # nothing queued

            # Accepted: what the check found is the job's first event.
            response = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(two_by_two), "config": {
                "preset": "tiny", "steps": 2, "split": {"test_subjects": ["sub-02"]}}})
            assert response.status_code == 201, response.text
            job = response.json()
            client.post(f"/api/jobs/{job['id']}/cancel")
            assert job["config"]["split"] == {"test_subjects": ["02"], "text_disjoint": True}
            [first, *_] = client.get(f"/api/jobs/{job['id']}/events").json()["data"]
            assert first["kind"] == "log" and first["message"].startswith(
                "Dataset check: 4 recordings. BIDS dataset: 2 subjects (01, 02), 2 sessions (1, 2), 1 task (reading), "
                "no runs; bad channels (left out): sub-01_ses-2_task-reading_eeg.edf: Cz; participants.tsv: 2 rows, "
                "columns age, sex, hand, weight, height.")
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.ci
def test_a_cross_subject_stage2_job_holds_out_exactly_the_named_subjects(tmp_path):
    # 01 and 02 read the same sentences (ZuCo-like), 03 its own: a cross-subject test on 03.
    root = write_dataset(tmp_path / "study", {("01", None): 3, ("02", None): 3, ("03", None): 4}, n_sentences=30)
    split = {"test_subjects": ["03"]}
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            stage1 = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(root), "config": {
                "preset": "tiny", "steps": 4, "probe_words": 0, "val_windows": 4, "log_every_s": 0.5,
                "split": split}})
            assert stage1.status_code == 201, stage1.text
            stage2 = client.post("/api/jobs", json={"stage": "stage2", "dataset": str(root), "after": stage1.json()["id"],
                                                    "config": {"preset": "tiny", "steps": 4, "log_every_s": 0.5,
                                                               "bootstrap_samples": 50, "split": split}})
            assert stage2.status_code == 201, stage2.text
            # Holding out 01 and 03 leaves 02, who read only what 01 read: text_disjoint leaves nothing to train.
            starved = client.post("/api/jobs", json={"stage": "stage2", "dataset": str(root), "after": stage1.json()["id"],
                                                     "config": {"preset": "tiny", "steps": 4,
                                                                "split": {"test_subjects": ["01", "03"]}}})
            assert starved.status_code == 201, starved.text
            events = client.get(f"/api/jobs/{stage2.json()['id']}/events").json()["data"]
            assert any("Dataset check: 3 recordings. BIDS dataset: 3 subjects (01, 02, 03)" in (e["message"] or "")
                       for e in events)

            first = server.wait_for_job(stage1.json()["id"], {"succeeded"})
            assert first["metrics"]["split"] == "subjects"
            assert (first["metrics"]["recordings_train"], first["metrics"]["recordings_held_out"]) == (2, 1)
            done = server.wait_for_job(stage2.json()["id"], {"succeeded"})
            report_artifact = next(a for a in done["artifacts"] if a["kind"] == "report")
            report = client.get(f"/api/artifacts/{report_artifact['id']}/download").json()
            logs = [e for e in client.get(f"/api/jobs/{done['id']}/events").json()["data"] if e["kind"] == "log"]
            failed = server.wait_for_job(starved.json()["id"], {"failed"})
            assert "No training sentences left: the subjects other than 01, 03 read only sentences the held-out " \
                   "subjects read too (30 left out); set split.text_disjoint to false" in failed["error"]
    finally:
        server.stop()
    assert report["split"]["split"] == "subjects" and report["split"]["test_subjects"] == ["03"]
    assert report["split"]["test"] == {"sentences": 30, "texts": report["split"]["test"]["texts"], "subjects": ["03"]}
    assert report["split"]["train"]["subjects"] == ["01", "02"] and report["split"]["val"]["subjects"] in (
        [], ["01", "02"])
    assert report["split"]["test_texts_seen_in_training"] == 0
    assert done["metrics"]["split"] == "subjects" and done["metrics"]["sentences_test"] == 30
    assert (done["metrics"]["subjects_train"], done["metrics"]["subjects_test"]) == (2, 1)
    # Per-subject figures are the held-out reader's; the verdict is the job's last log line.
    assert list(report["per_subject"]) == ["03"] and report["per_subject"]["03"]["sentences"] == 30
    assert logs[-1]["message"] == "Stage 2 verdict: " + report["verdict"]["sentence"]
