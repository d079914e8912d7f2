"""Any electrode cap: channels mapped onto a preset by name, else by electrode position.

Caps are real files written by MNE: an EGI HydroCel net (``E1`` ... ``E128``, positions only,
no 10-20 name) saved to FIF with its montage; the mapping is MNE's spherical spline.
"""

from __future__ import annotations

import mne
import numpy as np
import pytest

from trainer.config import CHANNELS_8, CHANNELS_32, EncoderConfig
from trainer.data.channel_map import MAX_NEAREST_M, by_position, interpolation_matrix, plan_channels, target_montage
from trainer.data.montage import standard_montage
from trainer.data.recordings import load_recording, open_recording
from trainer.data.synthetic import generate_raw
from trainer.exceptions import ChannelError

NET = mne.channels.make_standard_montage("GSN-HydroCel-129")
EGI = [name for name in NET.ch_names if name != "Cz"]  # E1 ... E128


def positions(info: mne.Info, names: list[str]) -> np.ndarray:
    return np.array([info["chs"][info.ch_names.index(n)]["loc"][:3] for n in names])


def egi_cap(names: list[str] = EGI, sfreq: float = 250.0) -> mne.Info:
    info = mne.create_info(names, sfreq, "eeg")
    info.set_montage(NET, on_missing="ignore")
    return info


def write_egi_recording(path, n_sentences: int = 40):
    """The synthetic generator's recording on a 10-20 cap, carried onto the EGI net by spline and
    saved as FIF with the net's montage: names that match no preset, positions that do."""
    raw = generate_raw(CHANNELS_32, seed=5, n_sentences=n_sentences, sfreq=250.0)
    goal = mne.channels.make_dig_montage(ch_pos={n: NET.get_positions()["ch_pos"][n] for n in EGI},
                                         **{k: NET.get_positions()[k] for k in ("nasion", "lpa", "rpa")},
                                         coord_frame="unknown")
    rows, matrix, _ = interpolation_matrix(raw.info, list(CHANNELS_32), goal)
    egi = mne.io.RawArray(matrix @ raw.get_data(), egi_cap(rows), verbose="error")
    egi.set_montage(NET, on_missing="ignore")
    egi.set_annotations(raw.annotations)
    egi.save(path, verbose="error")
    return path


def test_a_smooth_field_on_an_egi_net_is_interpolated_at_the_presets_positions():
    info = egi_cap()
    cmap = by_position(info, EGI, CHANNELS_32)
    assert cmap.method == "position" and cmap.present.all() and cmap.matrix.shape == (32, 128)
    target = mne.create_info(list(CHANNELS_32), 250.0, "eeg")
    target.set_montage(target_montage(CHANNELS_32))
    src, dst = positions(info, EGI), positions(target, list(CHANNELS_32))
    for axis in range(3):  # a field varying front-back, left-right, up-down
        field = src[:, axis]
        estimate = cmap.matrix @ field
        assert np.corrcoef(estimate, dst[:, axis])[0, 1] > 0.99
        assert np.abs(estimate - dst[:, axis]).max() < 0.1 * np.ptp(field)
    fz = cmap.describe()["Fz"]
    assert fz.startswith("interpolated from 128 electrodes (E11 ") and "nearest E11" in fz, fz


def test_names_that_match_keep_the_name_mapping_even_with_positions():
    names = [ch for ch in CHANNELS_8 if ch != "Pz"] + ["O1"]
    info = mne.create_info(names, 250.0, "eeg")
    info.set_montage(standard_montage())
    cmap = plan_channels(info, names, CHANNELS_8, needed=4)
    assert cmap.method == "name" and cmap.extras == ["O1"]
    assert cmap.describe()["Pz"] == "missing (no channel of that name)" and cmap.describe()["Fz"] == "by name (Fz)"


def test_a_preset_channel_far_from_every_electrode_is_left_missing(tmp_path):
    posterior = [n for n in EGI if NET.get_positions()["ch_pos"][n][1] < -0.03]  # back of the head only
    info = egi_cap(posterior)
    cmap = by_position(info, posterior, CHANNELS_8)
    how = cmap.describe()
    assert how["Pz"].startswith("interpolated") and not cmap.present[CHANNELS_8.index("Fz")]
    assert how["Fz"].startswith(f"missing (no electrode within {1000 * MAX_NEAREST_M:.0f} mm: nearest E"), how["Fz"]

    raw = mne.io.RawArray(np.random.default_rng(0).standard_normal((len(posterior), 2500)) * 1e-5, info,
                          verbose="error")
    path = tmp_path / "posterior_raw.fif"
    raw.save(path, verbose="error")
    with pytest.raises(ChannelError, match=r"posterior_raw.fif has 2 of the encoder's 8 channels by electrode "
                                           r"position; at least 4 are needed"):
        open_recording(path, EncoderConfig.from_name("tiny"))


def test_a_cap_with_neither_matching_names_nor_positions_is_refused(tmp_path):
    raw = mne.io.RawArray(np.zeros((16, 2500)), mne.create_info([f"E{i}" for i in range(1, 17)], 250.0, "eeg"),
                          verbose="error")
    raw.save(tmp_path / "bare_raw.fif", verbose="error")
    with pytest.raises(ChannelError, match="has 0 of the encoder's 8 channels; .* they have no positions to map by"):
        open_recording(tmp_path / "bare_raw.fif", EncoderConfig.from_name("tiny"))


def test_an_egi_recording_is_preprocessed_like_its_10_20_original(tmp_path):
    """Average reference, filters, resampling and scaling after the spline: the preset's channels
    from the EGI copy follow those from the original 10-20 recording."""
    egi = load_recording(write_egi_recording(tmp_path / "egi_raw.fif", n_sentences=20), EncoderConfig.from_name("tiny"))
    original = generate_raw(CHANNELS_32, seed=5, n_sentences=20, sfreq=250.0)
    original.save(tmp_path / "original_raw.fif", verbose="error")
    ref = load_recording(tmp_path / "original_raw.fif", EncoderConfig.from_name("tiny"))
    assert egi.present.all() and egi.data.shape == ref.data.shape
    assert egi.notes["mapping"] == "8 of 8 channels by position (from 128 electrodes)"
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(egi.data, ref.data)]
    assert min(r) > 0.9, r


@pytest.mark.slow
@pytest.mark.ci
def test_a_cap_of_another_layout_maps_by_position_with_the_mapping_in_the_events(server, tmp_path):
    path = write_egi_recording(tmp_path / "egi_net_raw.fif")
    with server.client() as client:
        response = client.post("/api/jobs", json={"stage": "stage1", "dataset": str(path), "config": {
            "preset": "tiny", "steps": 4, "batch_size": 8, "probe_words": 0, "val_windows": 8, "log_every_s": 1.0}})
        assert response.status_code == 201, response.text  # the submission check mapped it too
        job = server.wait_for_job(response.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        events = client.get(f"/api/jobs/{job['id']}/events").json()["data"]
    [event] = [e for e in events if e["kind"] == "log" and "channels" in (e["metrics"] or {})]
    assert event["message"].startswith("egi_net_raw.fif: 8 of 8 channels by position (from 128 electrodes)")
    channels = event["metrics"]["channels"]
    assert list(channels) == list(CHANNELS_8)
    assert all(how.startswith("interpolated from 128 electrodes (") for how in channels.values()), channels
    assert "nearest E" in channels["Cz"] and event["metrics"]["recording"] == str(path)
