"""Every format the generator writes reads back through the real reader with the same content.

The reference is the FIF copy (MNE's native format, lossless in float32). Each other format must
give the same encoder-grid signal after the full preprocessing chain, the same channel set and
the same words and sentences at the same times.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import CHANNELS_8, EncoderConfig
from trainer.data.recordings import load_recording, resolve_dataset
from trainer.data.synthetic import WRITERS, ensure_synthetic_dataset

TINY = EncoderConfig.from_name("tiny")
N_SENTENCES = 12
# Worst-case tolerances in robust-z units (the preprocessed signal has unit spread). EDF stores
# 16-bit integers, so its quantisation step over the exported range is the largest error (about
# 2e-4 measured); BDF's 24 bits, BrainVision's and EEGLAB's float32 leave float32 rounding only.
TOLERANCE = {"edf": 1e-3, "bids": 1e-3, "bdf": 1e-5, "brainvision": 1e-5, "eeglab": 1e-5}
# BrainVision stores marker positions in whole samples (256 Hz), and so does mne-bids' events.tsv
# (onset = sample / sfreq); the others keep seconds.
ONSET_TOLERANCE_S = {"brainvision": 1.0 / 256, "bids": 1.0 / 256}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="module")
def reference(cache):
    [path] = resolve_dataset(str(ensure_synthetic_dataset(cache, "synthetic", 5, CHANNELS_8, "fif", N_SENTENCES)),
                             cache, TINY)
    return load_recording(path, TINY)


@pytest.mark.parametrize("fmt", sorted(set(WRITERS) - {"fif"}))
def test_format_round_trips_through_the_reader(fmt, cache, reference):
    folder = ensure_synthetic_dataset(cache, "synthetic", 5, CHANNELS_8, fmt, N_SENTENCES)
    [path] = resolve_dataset(str(folder), cache, TINY)
    expected_suffix = {"edf": ".edf", "bdf": ".bdf", "brainvision": ".vhdr", "eeglab": ".set", "bids": ".edf"}
    assert path.suffix == expected_suffix[fmt]
    if fmt == "bids":
        assert path.parent == folder / "sub-01" / "eeg"
        assert (folder / "dataset_description.json").is_file()
        assert path.with_name("sub-01_task-reading_events.tsv").is_file()
    rec = load_recording(path, TINY)

    assert rec.present.all()
    assert rec.data.shape == reference.data.shape
    assert np.abs(rec.data - reference.data).max() < TOLERANCE[fmt], fmt

    assert [s.text for s in rec.sentences] == [s.text for s in reference.sentences]
    assert [w.text for w in rec.words] == [w.text for w in reference.words]
    assert len(rec.sentences) == N_SENTENCES
    np.testing.assert_allclose([w.onset_s for w in rec.words], [w.onset_s for w in reference.words],
                               atol=ONSET_TOLERANCE_S.get(fmt, 1e-4))
    np.testing.assert_allclose([s.duration_s for s in rec.sentences],
                               [s.duration_s for s in reference.sentences], atol=2 * ONSET_TOLERANCE_S.get(fmt, 1e-4))


def test_generator_is_deterministic_in_every_format(cache, tmp_path):
    for fmt in ("edf", "brainvision"):
        a = ensure_synthetic_dataset(cache, "synthetic", 5, CHANNELS_8, fmt, N_SENTENCES)
        b = ensure_synthetic_dataset(tmp_path, "synthetic", 5, CHANNELS_8, fmt, N_SENTENCES)
        [fa], [fb] = resolve_dataset(str(a), cache, TINY), resolve_dataset(str(b), tmp_path, TINY)
        ra, rb = load_recording(fa, TINY), load_recording(fb, TINY)
        np.testing.assert_array_equal(ra.data, rb.data)
        assert ra.words == rb.words


def test_unknown_format_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="Invalid synthetic format 'xdf'; expected one of"):
        ensure_synthetic_dataset(tmp_path, "synthetic", 0, CHANNELS_8, "xdf")
