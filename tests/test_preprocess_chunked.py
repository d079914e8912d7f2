"""Preprocessing a recording in chunks: same result as the whole recording, in bounded memory."""

from __future__ import annotations

import tracemalloc

import mne
import numpy as np
import pytest

from trainer.config import CHANNELS_32, CHANNELS_8, EncoderConfig
from trainer.data.recordings import PAD_S, load_dataset, preprocess_recording
from trainer.data.synthetic import generate_raw

TINY = EncoderConfig.from_name("tiny")
WHOLE = 1e9  # a chunk longer than any recording: one pass over the whole signal
# Chunked and whole results may differ only by float rounding: the padding covers every
# filter's reach, so no sample is computed from different input. In z-scored units (~1).
TOLERANCE = 1e-5


def write(raw: mne.io.BaseRaw, path):
    raw.save(path, verbose="error")
    return path


def memmap_allocator(path):
    return lambda shape: np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


@pytest.mark.parametrize("sfreq, chunk_s", [(256.0, 4.0), (500.0, 3.3)], ids=["256Hz", "500Hz"])
def test_chunked_equals_whole_recording(tmp_path, sfreq, chunk_s):
    # 500 Hz -> 128 Hz is a 32/125 ratio: chunk edges must land on the output grid.
    raw = generate_raw(CHANNELS_8 + ("O1", "Fp1"), seed=4, n_sentences=15, sfreq=sfreq)
    path = write(raw, tmp_path / "rec_raw.fif")
    whole = preprocess_recording(path, TINY, chunk_s=WHOLE)
    chunked = preprocess_recording(path, TINY, chunk_s=chunk_s)
    duration = raw.n_times / sfreq
    assert duration > 10 * chunk_s  # many chunks, the last one partial
    assert chunked.data.shape == whole.data.shape == (8, int(np.ceil(raw.n_times * TINY.sfreq / sfreq)))
    assert np.abs(chunked.data - whole.data).max() <= TOLERANCE
    assert 0.5 < whole.data.std() < 2.0
    assert chunked.words == whole.words and chunked.present.all()


def test_chunked_path_matches_mne_raw_methods(tmp_path):
    # The chunked array pipeline against MNE's own Raw methods applied to the whole recording
    # (recorded at the encoder's rate, so both skip resampling): the same steps, same result.
    raw = generate_raw(CHANNELS_8, seed=5, n_sentences=15, sfreq=TINY.sfreq)
    path = write(raw, tmp_path / "rec_raw.fif")
    ours = preprocess_recording(path, TINY, chunk_s=5.0).data
    ref = mne.io.read_raw(path, preload=True, verbose="error")
    ref.set_eeg_reference("average", projection=False, verbose="error")
    ref.notch_filter([50.0], verbose="error")
    ref.filter(0.5, 45.0, verbose="error")
    signals = ref.get_data(units="uV")
    median = np.median(signals, axis=1, keepdims=True)
    q75, q25 = np.percentile(signals, [75, 25], axis=1, keepdims=True)
    expected = (signals - median) / ((q75 - q25) / 1.349)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < TOLERANCE


def test_cache_is_written_in_chunks_and_mapped(tmp_path):
    raw = generate_raw(CHANNELS_8, seed=6, n_sentences=10)
    folder = tmp_path / "data"
    folder.mkdir()
    path = write(raw, folder / "rec_raw.fif")
    [cached] = load_dataset(str(folder), tmp_path, TINY)
    assert isinstance(cached.data, np.memmap)
    np.testing.assert_allclose(cached.data, preprocess_recording(path, TINY, chunk_s=WHOLE).data, atol=TOLERANCE)
    assert not list((tmp_path / "preprocessed").glob(".tmp-*"))


@pytest.mark.slow
def test_memory_is_bounded_by_the_chunk_not_the_recording(tmp_path):
    # 15 minutes of 32 channels at 256 Hz: 59 MB as the float64 MNE reads. The chunk is 30 s.
    raw = generate_raw(CHANNELS_32, seed=7, n_sentences=300)
    recording_bytes = raw.get_data().nbytes
    path = write(raw, tmp_path / "long_raw.fif")
    del raw
    assert recording_bytes > 50e6

    tracemalloc.start()
    try:
        preprocess_recording(path, TINY, allocate=memmap_allocator(tmp_path / "whole.npy"), chunk_s=WHOLE)
        _, whole_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        chunked = preprocess_recording(path, TINY, allocate=memmap_allocator(tmp_path / "chunked.npy"), chunk_s=30.0)
        _, chunked_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = np.load(tmp_path / "whole.npy", mmap_mode="r")
    print(f"\nrecording {recording_bytes / 1e6:.0f} MB (float64): peak traced memory "
          f"{whole_peak / 1e6:.0f} MB whole, {chunked_peak / 1e6:.1f} MB in 30 s chunks")
    # Whole: at least the recording itself is in memory (this is what the measure would catch).
    assert whole_peak > recording_bytes
    # Chunked: a padded chunk of the 32 input channels (30 s + 2 x 10 s of padding: 3.3 MB as
    # float64) a few times over for the filters' temporaries, plus the scaling sample (8
    # channels x 115200 samples, float32: 3.7 MB); far below the recording, and independent of
    # its length beyond the sample's cap (MAX_SCALE_SAMPLES).
    padded_chunk = (30.0 + 2 * PAD_S) * 256 * 32 * 8
    scale_sample = 8 * whole.shape[1] * 4
    assert chunked_peak < 6 * padded_chunk + scale_sample
    assert chunked_peak < 0.3 * recording_bytes
    assert np.abs(np.asarray(chunked.data) - whole).max() <= TOLERANCE
