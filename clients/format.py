"""Plain-text formatting of jobs for the CLI (sizes, durations, progress, status words).

Kept free of rich and httpx so that it is trivially testable and reusable in notebooks.
"""

from __future__ import annotations

from typing import Any

# Why a queued job is not running yet, in the user's words.
REASONS = {
    "dependency": "waiting for its Stage 1 job",
    "memory": "waiting for free memory",
}


def format_bytes(n: int | float | None) -> str:
    """Format a byte count with binary units, e.g. ``1.5 GiB``; ``-`` for ``None``.

    Parameters
    ----------
    n : int, float or None
        Number of bytes.

    Returns
    -------
    str
        The formatted size.
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``45s``, ``3m 05s`` or ``2h 10m``; ``-`` for ``None``.

    Parameters
    ----------
    seconds : float or None
        A duration.

    Returns
    -------
    str
        The formatted duration.
    """
    if seconds is None or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def format_progress(progress: dict[str, Any] | None, eta: bool = True) -> str:
    """Format a job's progress as ``120/200 (60%), ETA 1m 20s``.

    Parameters
    ----------
    progress : dict or None
        The job's ``progress`` object (``step``, ``total``, ``eta_s``).
    eta : bool
        Append the ETA while the job has steps left.

    Returns
    -------
    str
        The formatted progress, ``-`` before the first report.
    """
    if not progress or not progress.get("total"):
        return "-"
    step, total = progress.get("step") or 0, progress["total"]
    text = f"{step}/{total} ({100 * step / total:.0f}%)"
    if eta and progress.get("eta_s") is not None and step < total:
        text += f", ETA {format_duration(progress['eta_s'])}"
    return text


def format_memory(memory: dict[str, Any] | None, available: int | None = None) -> str:
    """Format a job's memory as ``RSS 410.0 MiB, peak 512.0 MiB, predicted 600.0 MiB``.

    Parameters
    ----------
    memory : dict or None
        The job's ``memory`` object.
    available : int or None
        The machine's available memory in bytes, appended as ``of ... available``.

    Returns
    -------
    str
        The formatted memory line.
    """
    memory = memory or {}
    parts = [f"RSS {format_bytes(memory.get('rss_bytes'))}", f"peak {format_bytes(memory.get('peak_rss_bytes'))}"]
    if memory.get("predicted_peak_bytes"):
        parts.append(f"predicted {format_bytes(memory['predicted_peak_bytes'])}")
    if memory.get("gpu_peak_reserved_bytes"):  # a GPU job: what the CUDA caching allocator held
        parts.append(f"GPU {format_bytes(memory.get('gpu_reserved_bytes'))} reserved, "
                     f"peak {format_bytes(memory['gpu_peak_reserved_bytes'])}")
    text = ", ".join(parts)
    if available:
        text += f" ({format_bytes(available)} available)"
    return text


# The same, in a table cell's few columns.
SHORT_REASONS = {"memory": "memory"}
SHORT_PHASES = {"loading data": "loading", "caching features": "caching"}


def busy_phase(job: dict[str, Any], short: bool = False) -> str | None:
    """What a running job's trainer does besides training steps (``probing``, ``caching
    features``, ...), or ``None``: a job training, or not running, is said by its progress."""
    phase = job.get("phase") if job.get("status") == "running" else None
    if not phase or phase == "training":
        return None
    return SHORT_PHASES.get(phase, phase) if short else phase


def progress_cell(job: dict[str, Any]) -> str:
    """A table cell of progress: ``120/200 (60%)``, or ``200/200 probing`` while the trainer is
    busy with something else than steps (at 100% for a minute, it is not stuck)."""
    text = format_progress(job.get("progress"), eta=False)
    phase = busy_phase(job, short=True)
    if phase is None:
        return text
    return f"{text.split(' ')[0]} {phase}" if text != "-" else phase


def short_status_label(job: dict[str, Any]) -> str:
    """:func:`status_label` for a table: ``queued (after 3)``, ``queued (memory)``."""
    status, reason = str(job.get("status", "unknown")), job.get("reason")
    if reason == "dependency" and job.get("after") is not None:
        return f"{status} (after {job['after']})"
    return f"{status} ({SHORT_REASONS.get(reason, reason)})" if reason else status


def status_label(job: dict[str, Any]) -> str:
    """The job's status in words, with the waiting reason when it has one.

    Parameters
    ----------
    job : dict
        A job from the API.

    Returns
    -------
    str
        E.g. ``"queued (waiting for free memory)"`` or ``"failed"``.
    """
    status = str(job.get("status", "unknown"))
    reason = job.get("reason")
    if reason:
        return f"{status} ({REASONS.get(reason, reason)})"
    return status


# --- metrics, in words -------------------------------------------------------------------------

# Labels of the metrics trainers report (trainer/stage1.py, stage2.py, evaluate.py, text_eval.py).
METRIC_LABELS = {
    "loss": "Training loss (last step)", "train_loss": "Training loss (final)",
    "train_loss_avg10": "Training loss (last 10 steps)", "val_loss": "Validation loss", "lr": "Learning rate",
    "samples_per_s": "Samples per second", "steps": "Steps trained", "parameters": "Encoder parameters",
    "split": "Split by", "recordings_train": "Recordings trained on", "recordings_held_out": "Recordings held out",
    "subjects_train": "Subjects trained on", "subjects_val": "Subjects (validation)", "subjects_test": "Subjects (test)",
    "sentences_train": "Sentences (training)", "sentences_val": "Sentences (validation)",
    "sentences_test": "Sentences (test)", "frozen_steps": "Steps with the encoder frozen",
    "unfrozen_steps": "Steps with the encoder trained", "probe_words": "Word probe: words",
    "probe_test_words": "Word probe: test words", "probe_chance": "Word probe: chance accuracy",
    "probe_acc": "Word probe: accuracy", "probe_acc_random_init": "Word probe: accuracy, random init",
    "probe_acc_raw": "Word probe: accuracy, raw signal", "probe_centroid_acc": "Nearest-centre probe: accuracy",
    "probe_centroid_acc_random_init": "Nearest-centre probe: accuracy, random init",
    "probe_centroid_acc_raw": "Nearest-centre probe: accuracy, raw signal",
    "val_loss_teacher_forced_diagnostic": "Validation loss (teacher-forced, a diagnostic)",
}
# Stage 2 scores come as test_<score>_<input>; these are their names and the inputs' names.
SCORE_LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "rouge1_f": "ROUGE-1 F",
                "wer": "WER", "cer": "CER", "distinct1": "Distinct-1", "distinct2": "Distinct-2",
                "retrieval_top1": "Retrieval top-1", "retrieval_top5": "Retrieval top-5",
                "content_bleu1": "Content BLEU-1", "content_rouge1": "Content ROUGE-1"}
INPUTS = ("eeg", "noise", "shuffled")
INPUT_LABELS = {"eeg": "EEG", "noise": "noise", "shuffled": "shuffled EEG"}


def _words(key: str) -> str:
    """A metric key no label names, as words (``val_loss_x`` -> ``Val loss x``)."""
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def score_label(score: str) -> str:
    return SCORE_LABELS.get(score, _words(score))


# Stage 2 figures beside the scores: test_<score>_<what>.
TEST_SUFFIXES = {"chance": "chance", "length_only": "length-only control",
                 "p_eeg_vs_shuffled": "p-value, EEG vs shuffled EEG"}


def test_label(rest: str) -> str:
    """The label of ``test_<rest>``, a Stage 2 figure that is not one input's score."""
    for suffix, words in TEST_SUFFIXES.items():
        if rest.endswith("_" + suffix):
            return f"{score_label(rest[:-len(suffix) - 1])}, {words}"
    return score_label(rest)


def describe_metrics(metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """A job's metrics for people: labelled rows, and Stage 2's scores side by side.

    Parameters
    ----------
    metrics : dict
        The job's ``metrics`` (flat keys as trainers report them).

    Returns
    -------
    rows : list of (label, value)
        Every metric not in the comparison, labelled (unknown keys in words), with the BLEU-1
        interval of EEG over noise as one row.
    scores : list of (label, [EEG, noise, shuffled EEG])
        Each ``test_<score>_<input>`` score, one row per score, ``-`` where an input is missing.
    """
    metrics = dict(metrics or {})
    rows: list[tuple[str, str]] = []
    diff = metrics.pop("test_bleu1_eeg_minus_noise", None)
    low, high = metrics.pop("test_bleu1_eeg_minus_noise_ci_low", None), metrics.pop("test_bleu1_eeg_minus_noise_ci_high", None)
    if isinstance(diff, (int, float)):
        interval = (f" (95% interval {low:+.3f} to {high:+.3f})"
                    if isinstance(low, (int, float)) and isinstance(high, (int, float)) else "")
        rows.append(("BLEU-1, EEG minus noise", f"{diff:+.3f}{interval}"))
    scores: dict[str, dict[str, Any]] = {}
    for key in list(metrics):
        if key.startswith("test_") and not any(key.endswith("_" + suffix) for suffix in TEST_SUFFIXES):
            score, _, source = key[len("test_"):].rpartition("_")
            if source in INPUTS and score:
                scores.setdefault(score, {})[source] = metrics.pop(key)
    for key, value in metrics.items():
        if key.startswith("test_"):
            label = test_label(key[len("test_"):])
        else:
            label = METRIC_LABELS.get(key) or _words(key)
        rows.append((label, format_value(value)))
    table = [(score_label(score), [format_value(by[s]) if s in by else "-" for s in INPUTS])
             for score, by in scores.items()]
    return rows, table


def describe_disk(disk: dict[str, Any] | None) -> str:
    """``/api/system``'s disk figures in one line."""
    if not disk:
        return "-"
    taken = (disk.get("jobs_bytes") or 0) + (disk.get("artifacts_bytes") or 0)
    return (f"{format_bytes(disk.get('free_bytes'))} free; NeuroLens takes {format_bytes(taken)} "
            f"(jobs {format_bytes(disk.get('jobs_bytes'))}, artifacts {format_bytes(disk.get('artifacts_bytes'))})")


def describe_jobs_by_status(counts: dict[str, int] | None) -> str:
    """``3 running, 1 queued, 12 succeeded`` (statuses with no job left out)."""
    parts = [f"{n} {status}" for status, n in (counts or {}).items() if n]
    return ", ".join(parts) or "none"


__all__ = ["REASONS", "busy_phase", "progress_cell", "describe_disk", "describe_jobs_by_status", "describe_metrics", "format_bytes",
           "format_duration", "format_memory", "format_progress", "format_value", "short_status_label",
           "status_label"]
