"""Formatting helpers shared by the CLI views."""

from clients.format import format_bytes, format_duration, format_memory, format_progress, status_label


def test_format_bytes() -> None:
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"


def test_format_duration() -> None:
    assert format_duration(None) == "-"
    assert format_duration(42.4) == "42s"
    assert format_duration(185) == "3m 05s"
    assert format_duration(2 * 3600 + 600) == "2h 10m"


def test_format_progress_and_memory() -> None:
    assert format_progress({"step": 0, "total": None, "eta_s": None}) == "-"
    assert format_progress({"step": 50, "total": 200, "eta_s": 90}) == "50/200 (25%), ETA 1m 30s"
    assert format_progress({"step": 200, "total": 200, "eta_s": 0}) == "200/200 (100%)"
    memory = {"rss_bytes": 1024**2, "peak_rss_bytes": 2 * 1024**2, "predicted_peak_bytes": None}
    assert format_memory(memory, 1024**3) == "RSS 1.0 MiB, peak 2.0 MiB (1.0 GiB available)"
    gpu = {**memory, "gpu_reserved_bytes": 3 * 1024**3, "gpu_peak_reserved_bytes": 4 * 1024**3}
    assert format_memory(gpu) == "RSS 1.0 MiB, peak 2.0 MiB, GPU 3.0 GiB reserved, peak 4.0 GiB"


def test_status_label_names_the_waiting_reason() -> None:
    assert status_label({"status": "queued", "reason": "memory"}) == "queued (waiting for free memory)"
    assert status_label({"status": "queued", "reason": "dependency"}) == "queued (waiting for its Stage 1 job)"
    assert status_label({"status": "failed", "reason": None}) == "failed"
