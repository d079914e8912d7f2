"""Synthetic generator, recording reader, channel mapping, text alignment and splits."""

from __future__ import annotations

import mne
import numpy as np
import pytest

from trainer.config import CHANNELS_8, EncoderConfig
from trainer.data.channel_map import map_channels
from trainer.data.recordings import load_recording, resolve_dataset, windows
from trainer.data.synthetic import VOCABULARY, ensure_synthetic_dataset, generate_raw
from trainer.data.text import read_events_tsv, split_by_text
from trainer.exceptions import ChannelError, DatasetError, RecordingError

TINY = EncoderConfig.from_name("tiny")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"), "synthetic", 0, CHANNELS_8, n_sentences=30)


def test_synthetic_fif_has_channels_annotations_and_montage(synthetic_dir):
    files = sorted(synthetic_dir.glob("*.fif"))
    assert [f.name for f in files] == ["sub-01_task-reading_eeg.fif"]
    raw = mne.io.read_raw(files[0], preload=False, verbose="error")
    assert raw.ch_names == list(CHANNELS_8)
    assert set(raw.get_channel_types()) == {"eeg"}
    assert raw.get_montage() is not None
    sentences = [d for d in raw.annotations.description if d.startswith("sentence:")]
    words = [d for d in raw.annotations.description if d.startswith("word:")]
    assert len(sentences) == 30
    assert all(4 <= len(s.split(":", 1)[1].split()) <= 7 for s in sentences)
    assert len(words) == sum(len(s.split(":", 1)[1].split()) for s in sentences)
    assert {w.split(":", 1)[1] for w in words} <= set(VOCABULARY)
    # Volts, as MNE expects: tens of microvolts.
    assert 2e-6 < raw.get_data().std() < 1e-4


def test_synthetic_is_deterministic_and_reused(synthetic_dir, tmp_path):
    a = generate_raw(CHANNELS_8, seed=0, n_sentences=5)
    b = generate_raw(CHANNELS_8, seed=0, n_sentences=5)
    c = generate_raw(CHANNELS_8, seed=1, n_sentences=5)
    np.testing.assert_array_equal(a.get_data(), b.get_data())
    assert list(a.annotations.description) == list(b.annotations.description)
    assert list(a.annotations.description) != list(c.annotations.description)
    # Generated once: a second call returns the same folder without rewriting it.
    mtime = (synthetic_dir / "dataset.json").stat().st_mtime_ns
    again = ensure_synthetic_dataset(synthetic_dir.parents[1], "synthetic", 0, CHANNELS_8, n_sentences=30)
    assert again == synthetic_dir and (again / "dataset.json").stat().st_mtime_ns == mtime
    assert not list(synthetic_dir.parent.glob(".tmp-*"))


def test_null_variant_shares_text_but_not_signal():
    real = generate_raw(CHANNELS_8, seed=0, n_sentences=5)
    null = generate_raw(CHANNELS_8, seed=0, null=True, n_sentences=5)
    assert list(real.annotations.description) == list(null.annotations.description)
    assert real.get_data().shape == null.get_data().shape
    assert not np.allclose(real.get_data(), null.get_data())


def test_load_recording_preprocesses_and_reads_sentences(synthetic_dir):
    rec = load_recording(next(synthetic_dir.glob("*.fif")), TINY)
    assert rec.data.shape[0] == 8 and rec.data.dtype == np.float32
    assert rec.present.all()
    assert rec.sfreq == TINY.sfreq  # resampled from 256 Hz
    assert 0.5 < rec.data.std() < 2.0  # robust z-scored
    assert len(rec.sentences) == 30 and rec.words
    assert rec.sentences[0].onset_s == pytest.approx(rec.words[0].onset_s)
    (train_x, train_m), (val_x, _) = windows([rec], TINY)
    assert train_x.shape[1:] == (8, TINY.window_samples) and len(val_x) >= 1
    assert train_m.all()


def test_missing_channels_are_masked_and_extras_dropped(tmp_path):
    names = ["EEG Fz-REF", "cz", "C3", "C4", "P3", "Pz", "EOG1"]
    mapping, extras = map_channels(names, CHANNELS_8)
    assert mapping == [None, 0, None, 2, 1, 3, 4, 5]
    assert extras == ["EOG1"]

    info = mne.create_info(["Fz", "Cz", "C3", "C4", "P3", "O1"], 128.0, "eeg")
    raw = mne.io.RawArray(np.random.default_rng(0).standard_normal((6, 128 * 10)) * 1e-5, info, verbose="error")
    path = tmp_path / "part_raw.fif"
    raw.save(path, verbose="error")
    rec = load_recording(path, TINY)
    assert rec.present.tolist() == [False, True, False, True, True, True, True, False]
    assert not rec.data[~rec.present].any()


def test_too_few_channels_is_a_clear_error(tmp_path):
    info = mne.create_info(["Fz", "Cz", "O1"], 128.0, "eeg")
    raw = mne.io.RawArray(np.zeros((3, 1280)), info, verbose="error")
    path = tmp_path / "few_raw.fif"
    raw.save(path, verbose="error")
    with pytest.raises(ChannelError, match=r"few_raw.fif has 2 of the encoder's 8 channels; at least 4"):
        load_recording(path, TINY)


def test_unreadable_and_missing_paths_name_the_file(tmp_path):
    bad = tmp_path / "broken.edf"
    bad.write_bytes(b"this is not an EDF file" * 10)
    with pytest.raises(RecordingError, match=r"Cannot read .*broken\.edf"):
        load_recording(bad, TINY)
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(str(tmp_path / "nope"), tmp_path, TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No recordings"):
        resolve_dataset(str(tmp_path / "empty"), tmp_path, TINY)


def test_bids_events_tsv_beside_recording(tmp_path):
    info = mne.create_info(list(CHANNELS_8), 128.0, "eeg")
    raw = mne.io.RawArray(np.random.default_rng(1).standard_normal((8, 128 * 20)) * 1e-5, info, verbose="error")
    eeg_dir = tmp_path / "sub-01" / "eeg"
    eeg_dir.mkdir(parents=True)
    raw.save(eeg_dir / "sub-01_task-read_eeg.fif", verbose="error")
    (eeg_dir / "sub-01_task-read_events.tsv").write_text(
        "onset\tduration\ttrial_type\tvalue\n"
        "1.0\t1.5\tsentence\tthe dog runs\n1.0\t0.3\tword\tthe\n1.3\t0.3\tword\tdog\n"
        "5.0\t1.2\tsentence\ta  bird sings\n")
    [path] = resolve_dataset(str(tmp_path), tmp_path, TINY)
    rec = load_recording(path, TINY)
    assert [(s.onset_s, s.text) for s in rec.sentences] == [(1.0, "the dog runs"), (5.0, "a bird sings")]
    assert [w.text for w in rec.words] == ["the", "dog"]
    sentences, _ = read_events_tsv(eeg_dir / "sub-01_task-read_events.tsv")
    assert len(sentences) == 2


def test_splits_keep_sentences_disjoint_and_are_deterministic():
    texts = [f"sentence number {i % 40}" for i in range(200)]
    splits = split_by_text(texts)
    assert split_by_text(list(texts)) == splits
    by_split = {name: {t for t, s in zip(texts, splits) if s == name} for name in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert not (by_split["val"] & by_split["test"])
    assert set(split_by_text(["a b", "c d", "e f"])) == {"train", "val", "test"}


def test_dataset_is_cached_on_disk_and_memory_mapped(synthetic_dir, tmp_path):
    from trainer.data.recordings import load_dataset

    [direct] = [load_recording(p, TINY) for p in resolve_dataset(str(synthetic_dir), tmp_path, TINY)]
    [first] = load_dataset(str(synthetic_dir), tmp_path, TINY)
    [cached] = sorted((tmp_path / "preprocessed").glob("*.npy"))
    written = cached.stat().st_mtime_ns
    [second] = load_dataset(str(synthetic_dir), tmp_path, TINY)
    assert cached.stat().st_mtime_ns == written  # read back, not preprocessed again
    for rec in (first, second):
        assert isinstance(rec.data, np.memmap) and not rec.data.flags.writeable
        np.testing.assert_array_equal(rec.data, direct.data)
        assert rec.words == direct.words and rec.sentences == direct.sentences
        assert rec.present.tolist() == direct.present.tolist()

    (train_x, train_m), (val_x, val_m) = windows([second], TINY)
    length = TINY.window_samples
    assert len(train_x) + len(val_x) == direct.data.shape[1] // length
    assert train_x.shape == (len(train_x), 8, length) and train_m.shape == (len(train_x), 8)
    picked = train_x[np.array([3, 0, 7])]
    assert picked.dtype == np.float32 and picked.shape == (3, 8, length)
    np.testing.assert_array_equal(picked[0], direct.data[:, 3 * length:4 * length])
    np.testing.assert_array_equal(val_x[:1][0], direct.data[:, len(train_x) * length:(len(train_x) + 1) * length])
